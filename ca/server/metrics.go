package server

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshid/meshid/ca"
)

// Metrics are the CA's Prometheus metrics.
type Metrics struct {
	requests    *prometheus.CounterVec
	jwtRequests *prometheus.CounterVec
	// Certificates issued for Kubernetes PodCertificateRequests.
	podCertificates prometheus.Counter
	authFailures    *prometheus.CounterVec
	issuance        prometheus.Histogram
	ledgerWrites    prometheus.Histogram
	reloads         *prometheus.CounterVec
	rateLimited     *prometheus.CounterVec
	nodeProxy       *prometheus.CounterVec
	// Every refusal by reason, and those the log left out (refusalLog).
	refusals              *prometheus.CounterVec
	refusalLogsSuppressed *prometheus.CounterVec
}

// NewMetrics registers the CA's metrics with reg. The expiry gauges read
// issuers on every scrape, so they follow reloads.
func NewMetrics(reg prometheus.Registerer, issuers ca.IssuerSource) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_requests_total",
			Help: "CreateCertificate requests by gRPC result code.",
		}, []string{"code"}),
		jwtRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_jwt_svid_requests_total",
			Help: "MintJWTSVID requests by gRPC result code.",
		}, []string{"code"}),
		podCertificates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshid_ca_pod_certificates_issued_total",
			Help: "Certificates issued for Kubernetes PodCertificateRequests (meshid's pod-certificate signer).",
		}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_auth_failures_total",
			Help: "Requests refused by authentication, by reason.",
		}, []string{"reason"}),
		issuance: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshid_ca_issuance_duration_seconds",
			Help:    "Time to serve a successful CreateCertificate, authentication included.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		ledgerWrites: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshid_ca_ledger_write_duration_seconds",
			Help:    "Time to record an issued certificate durably in the ledger (batched commits).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		rateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_rate_limited_total",
			Help: "Requests refused by a rate limit, by scope: pod (or identity, for tokens bound to no pod), namespace, global.",
		}, []string{"scope"}),
		nodeProxy: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_node_proxy_requests_total",
			Help: "Requests naming an ImpersonatedIdentity (Istio ambient's ztunnel asking for a workload on its node), by result: allowed, unavailable, or the reason refused.",
		}, []string{"result"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_refusals_total",
			Help: "CreateCertificate and MintJWTSVID requests refused, by reason (no_token, an authentication reason, bad_identity, denied, rate_limited, bad_ttl, csr, impersonation, node_proxy_unavailable, not_ready, sign_failed, not_recorded; audience for MintJWTSVID); each counted whether or not it was logged.",
		}, []string{"reason"}),
		refusalLogsSuppressed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_refusal_logs_suppressed_total",
			Help: "Refusals not written to the log because their reason logged 10 lines at once or 1 per second already; summarized in the log with their count.",
		}, []string{"reason"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshid_ca_plugin_reloads_total",
			Help: "Reloads of a plug-in CA after its files changed, by result.",
		}, []string{"result"}),
	}
	expiry := func(name string, pick func(*ca.Issuer) float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "meshid_ca_cert_expiry_timestamp_seconds",
			Help:        "NotAfter of the CA certificates in use, as a Unix time.",
			ConstLabels: prometheus.Labels{"cert": name},
		}, func() float64 {
			is := issuers.Issuer()
			if is == nil {
				return 0
			}
			return pick(is)
		})
	}
	reg.MustRegister(m.requests, m.jwtRequests, m.podCertificates, m.authFailures, m.issuance, m.ledgerWrites, m.reloads, m.rateLimited, m.nodeProxy, m.refusals, m.refusalLogsSuppressed,
		expiry("root", func(is *ca.Issuer) float64 { return float64(is.Root().NotAfter.Unix()) }),
		expiry("intermediate", func(is *ca.Issuer) float64 { return float64(is.Certificate().NotAfter.Unix()) }),
	)
	return m
}

// PluginReloaded counts a plug-in CA reload attempt.
func (m *Metrics) PluginReloaded(err error) {
	if err != nil {
		m.reloads.WithLabelValues("error").Inc()
		return
	}
	m.reloads.WithLabelValues("ok").Inc()
}
