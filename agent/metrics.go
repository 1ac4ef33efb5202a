package agent

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/status"
)

// Metrics is an Observer that exports the agent's CA exchanges to
// Prometheus.
type Metrics struct {
	expiry   *prometheus.GaugeVec
	issued   prometheus.Counter
	failures *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	failing  prometheus.Gauge
	behind   prometheus.Gauge

	mu         sync.Mutex
	failingIDs map[spiffeid.ID]struct{}
}

// NewMetrics registers the agent's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshid_agent_cert_expiry_timestamp_seconds",
			Help: "NotAfter of the certificate served for each identity, as a Unix time.",
		}, []string{"spiffe_id"}),
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshid_agent_certificates_received_total",
			Help: "Certificates received from the CA (first ones and rotations).",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_agent_ca_failures_total",
			Help: "Failed certificate requests, by gRPC code.",
		}, []string{"code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshid_agent_ca_request_duration_seconds",
			Help:    "Time from key generation to a checked answer from the CA, by result.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 10),
		}, []string{"result"}),
		// A count, not a series per identity: alerts need "any failing on
		// this node", the log says which, and a node agent's series stay
		// one per identity (the expiry).
		failing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshid_agent_identities_failing",
			Help: "Identities whose last certificate request failed.",
		}),
		behind: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshid_agent_clock_behind_ca_seconds",
			Help: "How far this node's clock is behind the CA's at least, as the last certificate proved (0: not behind); renewals follow the CA's clock.",
		}),
		failingIDs: map[spiffeid.ID]struct{}{},
	}
	reg.MustRegister(m.expiry, m.issued, m.failures, m.latency, m.failing, m.behind)
	return m
}

// Issued records a certificate received.
func (m *Metrics) Issued(id spiffeid.ID, svid *SVID, took time.Duration) {
	m.issued.Inc()
	m.latency.WithLabelValues("ok").Observe(took.Seconds())
	m.expiry.WithLabelValues(id.String()).Set(float64(svid.NotAfter.Unix()))
	m.setFailing(id, false)
}

// Failed records a failed request.
func (m *Metrics) Failed(id spiffeid.ID, err error, took time.Duration) {
	m.failures.WithLabelValues(status.Code(err).String()).Inc()
	m.latency.WithLabelValues("error").Observe(took.Seconds())
	m.setFailing(id, true)
}

// ClockBehind records how far behind the CA's clock this node's is.
func (m *Metrics) ClockBehind(d time.Duration) { m.behind.Set(d.Seconds()) }

// Forget drops the series of an identity no longer held.
func (m *Metrics) Forget(id spiffeid.ID) {
	m.expiry.DeleteLabelValues(id.String())
	m.setFailing(id, false)
}

func (m *Metrics) setFailing(id spiffeid.ID, failing bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if failing {
		m.failingIDs[id] = struct{}{}
	} else {
		delete(m.failingIDs, id)
	}
	m.failing.Set(float64(len(m.failingIDs)))
}
