package server

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limits bound how fast certificates are issued, in three scopes, each a
// token bucket (a zero Rate switches one off):
//
//   - per pod (the pod the token is bound to; per identity for tokens bound
//     to no pod): one pod asking in a loop is stopped, while the replicas of
//     one Deployment restarting together are not held back by their one
//     service account;
//   - per namespace: whoever may create pods or service accounts in a
//     namespace cannot multiply the per-pod buckets without bound;
//   - for the whole CA: the ledger, which keeps a row per certificate, grows
//     by at most Global.Rate rows a second whatever the callers do.
//
// Bursts are sized for restart storms: thousands of new pods at once are
// served at full speed, then the sustained rates apply.
type Limits struct {
	Pod, Namespace, Global Limit
}

// Limit is one token bucket: Rate per second sustained, Burst at once.
type Limit struct {
	Rate  rate.Limit
	Burst int
}

func (l Limit) on() bool { return l.Rate > 0 }

// limiter applies Limits. Buckets idle for idleAfter are swept, so the maps
// hold only pods and namespaces seen recently.
type limiter struct {
	limits Limits
	now    func() time.Time

	mu         sync.Mutex
	pods       map[string]*bucket
	namespaces map[string]*bucket
	global     *rate.Limiter
	lastSweep  time.Time
}

type bucket struct {
	lim      *rate.Limiter
	lastSeen time.Time
}

const idleAfter = 10 * time.Minute

func newLimiter(limits Limits, now func() time.Time) *limiter {
	l := &limiter{limits: limits, now: now, pods: map[string]*bucket{}, namespaces: map[string]*bucket{}}
	if limits.Global.on() {
		l.global = rate.NewLimiter(limits.Global.Rate, limits.Global.Burst)
	}
	return l
}

// Scopes a refusal names.
const (
	scopePod       = "pod"
	scopeNamespace = "namespace"
	scopeGlobal    = "global"
)

// allow reports whether one more certificate may be issued now for the pod
// key in namespace, and if not, which scope refused. A refused request
// takes nothing from the buckets that would have allowed it.
func (l *limiter) allow(key, namespace string) (ok bool, scope string) {
	if l == nil {
		return true, ""
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > idleAfter {
		for _, m := range []map[string]*bucket{l.pods, l.namespaces} {
			for k, b := range m {
				if now.Sub(b.lastSeen) > idleAfter {
					delete(m, k)
				}
			}
		}
		l.lastSweep = now
	}
	type step struct {
		lim   *rate.Limiter
		scope string
	}
	var steps []step
	if l.limits.Pod.on() {
		steps = append(steps, step{l.bucket(l.pods, key, l.limits.Pod, now), scopePod})
	}
	if l.limits.Namespace.on() {
		steps = append(steps, step{l.bucket(l.namespaces, namespace, l.limits.Namespace, now), scopeNamespace})
	}
	if l.global != nil {
		steps = append(steps, step{l.global, scopeGlobal})
	}
	var taken []*rate.Reservation
	for _, s := range steps {
		r := s.lim.ReserveN(now, 1)
		if !r.OK() || r.DelayFrom(now) > 0 {
			r.CancelAt(now)
			for _, t := range taken {
				t.CancelAt(now)
			}
			return false, s.scope
		}
		taken = append(taken, r)
	}
	return true, ""
}

func (l *limiter) bucket(m map[string]*bucket, key string, lim Limit, now time.Time) *rate.Limiter {
	b, ok := m[key]
	if !ok {
		b = &bucket{lim: rate.NewLimiter(lim.Rate, lim.Burst)}
		m[key] = b
	}
	b.lastSeen = now
	return b.lim
}
