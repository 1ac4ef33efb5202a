package k8sauth

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Algorithms Kubernetes can sign service-account tokens with.
var signatureAlgorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.ES512, jose.PS256, jose.PS384, jose.PS512,
}

// MaxTokenBytes bounds a token; projected tokens are about 1 KiB.
const MaxTokenBytes = 16 << 10

// KeySource gives the issuer's public keys with the given key ID.
type KeySource interface {
	Keys(ctx context.Context, kid string) ([]jose.JSONWebKey, error)
}

// JWKS authenticates projected service-account tokens offline: signature
// against the issuer's keys, issuer, audience, expiry and not-before, and the
// kubernetes.io claims. It cannot see a service account deleted before its
// token expires; keep tokens short-lived (Kubernetes' default is one hour).
type JWKS struct {
	Issuer    string   // the cluster's --service-account-issuer
	Audiences []string // required
	Keys      KeySource
	Leeway    time.Duration    // clock skew allowed on exp/nbf/iat; 0 means none
	Now       func() time.Time // nil means time.Now
}

// Authenticate verifies token and returns its service account. What the
// claims alone refuse is refused before any key is looked up.
func (j *JWKS) Authenticate(ctx context.Context, raw string) (Caller, error) {
	t, err := parseToken(raw)
	if err != nil {
		return Caller{}, err
	}
	now := time.Now()
	if j.Now != nil {
		now = j.Now()
	}
	if j.Issuer == "" {
		// An empty issuer would switch the issuer check off.
		return Caller{}, refused("issuer", "no token issuer configured")
	}
	if err := t.check(j.Audiences, j.Issuer, now, j.Leeway); err != nil {
		return Caller{}, err
	}
	keys, err := j.Keys.Keys(ctx, t.kid)
	if err != nil {
		return Caller{}, unavailable(err)
	}
	if !t.verify(keys) {
		return Caller{}, refused("signature", "no issuer key verifies the token")
	}
	return t.caller(MethodJWKS), nil
}

// KeySet is a JWKS read from a file or a URL, cached, and read again when it
// is older than MaxAge or when a token names a key it lacks (at most once
// per MinRefresh, so unknown key IDs cannot make it hammer the source).
type KeySet struct {
	fetch      func(ctx context.Context) ([]byte, error)
	maxAge     time.Duration
	minRefresh time.Duration
	now        func() time.Time

	cur       atomic.Pointer[keySnapshot]
	mu        sync.Mutex // serialises refreshes
	lastFetch time.Time
}

type keySnapshot struct {
	set       jose.JSONWebKeySet
	fetchedAt time.Time
}

// NewFileKeySet reads a JWKS from path, re-reading it every few seconds so a
// rotated issuer key is picked up.
func NewFileKeySet(path string) *KeySet {
	return &KeySet{
		fetch:      func(context.Context) ([]byte, error) { return os.ReadFile(path) },
		maxAge:     10 * time.Second,
		minRefresh: time.Second,
		now:        time.Now,
	}
}

// NewURLKeySet fetches a JWKS from url with client (nil means
// http.DefaultClient), e.g. the API server's /openid/v1/jwks.
func NewURLKeySet(url string, client *http.Client) *KeySet {
	if client == nil {
		client = http.DefaultClient
	}
	return &KeySet{
		fetch: func(ctx context.Context) ([]byte, error) {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if err != nil {
				return nil, err
			}
			resp, err := client.Do(req)
			if err != nil {
				return nil, err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
			}
			return io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		},
		maxAge:     5 * time.Minute,
		minRefresh: 10 * time.Second,
		now:        time.Now,
	}
}

// Load fetches the keys now; call it at start to fail early on a bad source.
func (s *KeySet) Load(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refreshLocked(ctx)
}

// Keys returns the keys with key ID kid (all keys when kid is empty).
func (s *KeySet) Keys(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	snap := s.cur.Load()
	if snap != nil && s.now().Sub(snap.fetchedAt) < s.maxAge {
		if keys := lookup(&snap.set, kid); len(keys) > 0 {
			return keys, nil
		}
	}
	s.mu.Lock()
	if cur := s.cur.Load(); cur == snap && s.now().Sub(s.lastFetch) >= s.minRefresh {
		if err := s.refreshLocked(ctx); err != nil && snap == nil {
			s.mu.Unlock()
			return nil, err
		}
		// A failed refresh keeps serving the keys we had.
	}
	s.mu.Unlock()
	if snap = s.cur.Load(); snap == nil {
		return nil, fmt.Errorf("k8sauth: no JWKS loaded")
	}
	return lookup(&snap.set, kid), nil
}

func (s *KeySet) refreshLocked(ctx context.Context) error {
	s.lastFetch = s.now()
	data, err := s.fetch(ctx)
	if err != nil {
		return fmt.Errorf("k8sauth: reading JWKS: %w", err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(data, &set); err != nil {
		return fmt.Errorf("k8sauth: parsing JWKS: %w", err)
	}
	for _, k := range set.Keys {
		if !k.IsPublic() {
			return fmt.Errorf("k8sauth: JWKS holds a private key (kid %q); refusing it", k.KeyID)
		}
	}
	if len(set.Keys) == 0 {
		return fmt.Errorf("k8sauth: JWKS has no keys")
	}
	s.cur.Store(&keySnapshot{set: set, fetchedAt: s.lastFetch})
	return nil
}

func lookup(set *jose.JSONWebKeySet, kid string) []jose.JSONWebKey {
	if kid == "" {
		return set.Keys
	}
	return set.Key(kid)
}
