package k8sauth

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics count how tokens were decided: from a cache, locally, or by a
// TokenReview, and how reviews queued. A nil *Metrics counts nothing.
type Metrics struct {
	reviews   *prometheus.CounterVec
	local     *prometheus.CounterVec
	cacheHits *prometheus.CounterVec
	coalesced prometheus.Counter
	queueWait prometheus.Histogram
	inFlight  prometheus.Gauge
	queued    prometheus.Gauge
	offline   prometheus.Gauge
}

// NewMetrics registers the metrics with reg, each name starting with prefix
// (meshid_ca, meshid_agent).
func NewMetrics(reg prometheus.Registerer, prefix string) *Metrics {
	m := &Metrics{
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: prefix + "_token_reviews_total",
			Help: "TokenReviews sent to the API server, by result: authenticated, refused, error (API server unreachable or failing), canceled (no request waited for the answer any more).",
		}, []string{"result"}),
		local: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: prefix + "_tokens_decided_locally_total",
			Help: "Tokens decided without asking the API server, by result (accepted: verified against the cluster's keys and its pods and service accounts as watched; refused) and reason.",
		}, []string{"result", "reason"}),
		cacheHits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: prefix + "_token_cache_hits_total",
			Help: "Requests answered from the token cache, by result: accepted (a recent success) or refused (a recent refusal by the API server).",
		}, []string{"result"}),
		coalesced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: prefix + "_token_reviews_coalesced_total",
			Help: "Requests that shared a TokenReview already under way for the same token instead of sending their own.",
		}),
		queueWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    prefix + "_token_review_queue_seconds",
			Help:    "Time a TokenReview waited for a slot (--token-review-concurrency) before it was sent.",
			Buckets: []float64{.0001, .001, .005, .01, .05, .1, .5, 1, 5},
		}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: prefix + "_token_reviews_in_flight",
			Help: "TokenReviews sent and not yet answered.",
		}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: prefix + "_token_reviews_queued",
			Help: "TokenReviews waiting for a slot.",
		}),
		offline: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: prefix + "_token_offline_ready",
			Help: "1 while tokens can be verified without a TokenReview: the cluster's keys are known, pods and service accounts are watched, and the API server answered within the last few seconds.",
		}),
	}
	reg.MustRegister(m.reviews, m.local, m.cacheHits, m.coalesced, m.queueWait, m.inFlight, m.queued, m.offline)
	return m
}

func (m *Metrics) reviewed(result string) {
	if m != nil {
		m.reviews.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) decidedLocally(err error) {
	if m == nil {
		return
	}
	if err == nil {
		m.local.WithLabelValues("accepted", "").Inc()
		return
	}
	m.local.WithLabelValues("refused", Reason(err)).Inc()
}

func (m *Metrics) cacheHit(accepted bool) {
	if m == nil {
		return
	}
	if accepted {
		m.cacheHits.WithLabelValues("accepted").Inc()
		return
	}
	m.cacheHits.WithLabelValues("refused").Inc()
}

func (m *Metrics) joined() {
	if m != nil {
		m.coalesced.Inc()
	}
}

func (m *Metrics) waited(d time.Duration) {
	if m != nil {
		m.queueWait.Observe(d.Seconds())
	}
}

func (m *Metrics) setQueue(inFlight, queued int) {
	if m != nil {
		m.inFlight.Set(float64(inFlight))
		m.queued.Set(float64(queued))
	}
}

func (m *Metrics) setOffline(ready bool) {
	if m == nil {
		return
	}
	if ready {
		m.offline.Set(1)
		return
	}
	m.offline.Set(0)
}
