package server

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// A flood of bad requests must not become a flood of log lines: each
// reason may log refusalLogBurst lines at once, then one per
// refusalLogEvery. What is not logged is counted, said on the reason's next
// line (suppressed=N) or, when the flood has stopped, in a summary line
// refusalLogEvery later. Every refusal is counted in
// meshid_ca_refusals_total{reason} whether logged or not.
const (
	refusalLogBurst = 10
	refusalLogEvery = time.Second
)

// refusalLog writes refusals at a bounded rate per reason.
type refusalLog struct {
	log     *slog.Logger // for summary lines
	metrics *Metrics
	now     func() time.Time
	every   time.Duration // refusalLogEvery; shorter in tests

	mu      sync.Mutex
	reasons map[string]*refusalBucket
}

type refusalBucket struct {
	tokens     float64
	last       time.Time
	suppressed uint64
	flushing   bool // a summary is scheduled
}

func newRefusalLog(log *slog.Logger, m *Metrics, now func() time.Time) *refusalLog {
	return &refusalLog{log: log, metrics: m, now: now, every: refusalLogEvery, reasons: map[string]*refusalBucket{}}
}

// refuse counts a refusal for reason and logs msg with args at level on
// log (which carries the request's context) if the reason's rate allows.
func (r *refusalLog) refuse(log *slog.Logger, level slog.Level, reason, msg string, args ...any) {
	r.metrics.refusals.WithLabelValues(reason).Inc()
	r.mu.Lock()
	b := r.reasons[reason]
	now := r.now()
	if b == nil {
		b = &refusalBucket{tokens: refusalLogBurst, last: now}
		r.reasons[reason] = b
	}
	b.tokens = min(refusalLogBurst, b.tokens+float64(now.Sub(b.last))/float64(r.every))
	b.last = now
	if b.tokens < 1 {
		b.suppressed++
		schedule := !b.flushing
		b.flushing = true
		r.mu.Unlock()
		r.metrics.refusalLogsSuppressed.WithLabelValues(reason).Inc()
		if schedule {
			time.AfterFunc(r.every, func() { r.summarize(reason) })
		}
		return
	}
	b.tokens--
	suppressed := b.suppressed
	b.suppressed = 0
	r.mu.Unlock()
	args = append([]any{"reason", reason}, args...)
	if suppressed > 0 {
		args = append(args, "suppressed", suppressed)
	}
	log.Log(context.Background(), level, msg, args...)
}

// summarize says how many refusals for reason went unlogged since its last
// line, if any did.
func (r *refusalLog) summarize(reason string) {
	r.mu.Lock()
	b := r.reasons[reason]
	n := b.suppressed
	b.suppressed = 0
	b.flushing = false
	r.mu.Unlock()
	if n > 0 {
		r.log.Warn("refusals not logged, to keep the log readable (each is counted in meshid_ca_refusals_total)",
			"reason", reason, "suppressed", n, "per", r.every)
	}
}
