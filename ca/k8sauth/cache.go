package k8sauth

import (
	"context"
	"crypto/sha256"
	"errors"
	"sync"
	"time"
)

// Cache remembers decisions so that a renewal storm costs one check per
// token, not one per request, and shares a check under way between the
// requests that carry the same token.
//
//   - Successes are remembered for TTL, never past the token's expiry.
//   - Refusals by the API server (a TokenReview that said no) are remembered
//     for NegativeTTL, so a client repeating a bad token costs one review,
//     not one per request. Refusals decided locally are cheap to repeat and
//     are not remembered; neither is an unreachable API server.
//   - Concurrent requests with one token share one check. The shared check
//     is cancelled when every request waiting for it has gone.
//
// Entries are keyed by SHA-256 of the token, never the token itself; each
// kind is bounded by Size.
type Cache struct {
	auth        Authenticator
	ttl         time.Duration
	negativeTTL time.Duration
	size        int
	now         func() time.Time
	metrics     *Metrics

	mu       sync.RWMutex
	accepted map[[sha256.Size]byte]cacheEntry
	refused  map[[sha256.Size]byte]cacheEntry
	flights  map[[sha256.Size]byte]*flight
}

// CacheConfig sets a [Cache] up. Zero TTLs or Size disable remembering
// (requests still share checks in flight).
type CacheConfig struct {
	TTL         time.Duration
	NegativeTTL time.Duration
	Size        int
	Now         func() time.Time // nil means time.Now
	Metrics     *Metrics
}

// reviewTimeout bounds one check shared by concurrent requests.
const reviewTimeout = 10 * time.Second

type cacheEntry struct {
	caller  Caller
	err     error
	expires time.Time
}

// flight is a check under way, shared by waiters requests.
type flight struct {
	done    chan struct{}
	caller  Caller
	err     error
	waiters int
	cancel  context.CancelFunc
}

// NewCache wraps auth.
func NewCache(auth Authenticator, cfg CacheConfig) *Cache {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Cache{auth: auth, ttl: cfg.TTL, negativeTTL: cfg.NegativeTTL, size: cfg.Size, now: cfg.Now, metrics: cfg.Metrics,
		accepted: make(map[[sha256.Size]byte]cacheEntry),
		refused:  make(map[[sha256.Size]byte]cacheEntry),
		flights:  make(map[[sha256.Size]byte]*flight),
	}
}

// Authenticate returns the remembered decision for token, joins a check of
// it under way, or starts one.
func (c *Cache) Authenticate(ctx context.Context, token string) (Caller, error) {
	key := sha256.Sum256([]byte(token))
	now := c.now()
	c.mu.RLock()
	e, ok := c.lookupLocked(key, now)
	c.mu.RUnlock()
	if ok {
		c.metrics.cacheHit(e.err == nil)
		return e.caller, e.err
	}

	c.mu.Lock()
	// A check may have finished since the look above.
	if e, ok := c.lookupLocked(key, now); ok {
		c.mu.Unlock()
		c.metrics.cacheHit(e.err == nil)
		return e.caller, e.err
	}
	f, joined := c.flights[key]
	if !joined {
		// The check must not fail because the request that started it went
		// away while others wait; it ends when the last one leaves.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reviewTimeout)
		f = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[key] = f
		go c.check(fctx, key, f, token)
	}
	f.waiters++
	c.mu.Unlock()
	if joined {
		c.metrics.joined()
	}

	select {
	case <-f.done:
		return f.caller, f.err
	case <-ctx.Done():
		c.mu.Lock()
		f.waiters--
		if f.waiters == 0 {
			f.cancel()
		}
		c.mu.Unlock()
		return Caller{}, unavailable(ctx.Err())
	}
}

func (c *Cache) lookupLocked(key [sha256.Size]byte, now time.Time) (cacheEntry, bool) {
	e, ok := c.accepted[key]
	if !ok {
		e, ok = c.refused[key]
	}
	return e, ok && now.Before(e.expires)
}

func (c *Cache) check(ctx context.Context, key [sha256.Size]byte, f *flight, token string) {
	defer f.cancel()
	f.caller, f.err = c.auth.Authenticate(ctx, token)
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.flights, key)
	switch {
	case f.err == nil:
		c.storeLocked(c.accepted, key, cacheEntry{caller: f.caller}, c.ttl)
	case refusedByAPIServer(f.err):
		c.storeLocked(c.refused, key, cacheEntry{err: f.err}, c.negativeTTL)
	}
	close(f.done)
}

func (c *Cache) storeLocked(m map[[sha256.Size]byte]cacheEntry, key [sha256.Size]byte, e cacheEntry, ttl time.Duration) {
	if ttl <= 0 || c.size <= 0 {
		return
	}
	now := c.now()
	e.expires = now.Add(ttl)
	if !e.caller.Expiry.IsZero() && e.caller.Expiry.Before(e.expires) {
		e.expires = e.caller.Expiry
	}
	if !e.expires.After(now) {
		return
	}
	if len(m) >= c.size {
		for k, old := range m {
			if !now.Before(old.expires) {
				delete(m, k)
			}
		}
		// Still full of live entries: drop a tenth, arbitrary ones, so the
		// sweep is paid once per many inserts. Map iteration order is
		// random, so no caller can aim at a victim; and refusals live in a
		// map of their own, so a flood of bad tokens cannot push out the
		// good ones.
		for k := range m {
			if len(m) < c.size-c.size/10 {
				break
			}
			delete(m, k)
		}
	}
	m[key] = e
}

// Waiting is the number of requests waiting for checks under way.
func (c *Cache) Waiting() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	n := 0
	for _, f := range c.flights {
		n += f.waiters
	}
	return n
}

// Len is the number of remembered decisions, live or not yet swept.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.accepted) + len(c.refused)
}

func refusedByAPIServer(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.remote && !e.unavailable
}
