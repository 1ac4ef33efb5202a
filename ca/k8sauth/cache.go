package k8sauth

import (
	"context"
	"crypto/sha256"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// Cache remembers successful authentications so that a renewal storm costs
// one review per token, not one per request. Entries are keyed by SHA-256 of
// the token, live no longer than TTL nor than the token itself, and there
// are at most Size of them. Failures are not cached. Concurrent requests with
// the same token share one review.
type Cache struct {
	auth Authenticator
	ttl  time.Duration
	size int
	now  func() time.Time

	mu      sync.RWMutex
	entries map[[sha256.Size]byte]cacheEntry
	flight  singleflight.Group
}

// reviewTimeout bounds one review shared by concurrent requests.
const reviewTimeout = 10 * time.Second

type cacheEntry struct {
	caller  Caller
	expires time.Time
}

// NewCache wraps auth. A ttl or size of zero disables caching (requests still
// share reviews in flight). now nil means time.Now.
func NewCache(auth Authenticator, ttl time.Duration, size int, now func() time.Time) *Cache {
	if now == nil {
		now = time.Now
	}
	return &Cache{auth: auth, ttl: ttl, size: size, now: now, entries: make(map[[sha256.Size]byte]cacheEntry)}
}

// Authenticate returns the cached caller for token or asks the wrapped
// authenticator.
func (c *Cache) Authenticate(ctx context.Context, token string) (Caller, error) {
	key := sha256.Sum256([]byte(token))
	now := c.now()
	c.mu.RLock()
	e, ok := c.entries[key]
	c.mu.RUnlock()
	if ok && now.Before(e.expires) {
		return e.caller, nil
	}
	v, err, _ := c.flight.Do(string(key[:]), func() (any, error) {
		// Requests waiting on this review must not fail because the first
		// one's client went away.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), reviewTimeout)
		defer cancel()
		caller, err := c.auth.Authenticate(ctx, token)
		if err == nil {
			c.store(key, caller)
		}
		return caller, err
	})
	if err != nil {
		return Caller{}, err
	}
	return v.(Caller), nil
}

func (c *Cache) store(key [sha256.Size]byte, caller Caller) {
	if c.ttl <= 0 || c.size <= 0 {
		return
	}
	now := c.now()
	expires := now.Add(c.ttl)
	if !caller.Expiry.IsZero() && caller.Expiry.Before(expires) {
		expires = caller.Expiry
	}
	if !expires.After(now) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= c.size {
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
		// Still full of live entries: drop a tenth, arbitrary ones, so the
		// sweep is paid once per many inserts. Map iteration order is
		// random, so no caller can aim at a victim.
		for k := range c.entries {
			if len(c.entries) < c.size-c.size/10 {
				break
			}
			delete(c.entries, k)
		}
	}
	c.entries[key] = cacheEntry{caller: caller, expires: expires}
}

// Len is the number of entries, live or not yet swept.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}
