package server

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// limiter keeps one token bucket per identity. Buckets idle for idleAfter
// are swept, so the map holds only identities seen recently.
type limiter struct {
	limit rate.Limit
	burst int
	now   func() time.Time

	mu        sync.Mutex
	buckets   map[string]*bucket
	lastSweep time.Time
}

type bucket struct {
	lim      *rate.Limiter
	lastSeen time.Time
}

const idleAfter = 10 * time.Minute

func newLimiter(limit rate.Limit, burst int, now func() time.Time) *limiter {
	return &limiter{limit: limit, burst: burst, now: now, buckets: make(map[string]*bucket)}
}

// allow reports whether id may have one more certificate now. A zero limit
// disables limiting.
func (l *limiter) allow(id string) bool {
	if l == nil || l.limit <= 0 {
		return true
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) > idleAfter {
		for k, b := range l.buckets {
			if now.Sub(b.lastSeen) > idleAfter {
				delete(l.buckets, k)
			}
		}
		l.lastSweep = now
	}
	b, ok := l.buckets[id]
	if !ok {
		b = &bucket{lim: rate.NewLimiter(l.limit, l.burst)}
		l.buckets[id] = b
	}
	b.lastSeen = now
	return b.lim.AllowN(now, 1)
}
