package k8sauth_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/internal/satoken"
)

func TestParseUsername(t *testing.T) {
	for _, tc := range []struct {
		in     string
		ns, sa string
		ok     bool
	}{
		{in: "system:serviceaccount:demo:web", ns: "demo", sa: "web", ok: true},
		{in: "system:serviceaccount:demo:web.v2", ns: "demo", sa: "web.v2", ok: true},
		{in: "system:serviceaccount:demo", ok: false},
		{in: "system:serviceaccount:demo:web:extra", ok: false},
		{in: "system:serviceaccount::web", ok: false},
		{in: "system:serviceaccount:demo:", ok: false},
		{in: "system:serviceaccount:Demo:web", ok: false},
		{in: "system:serviceaccount:de/mo:web", ok: false},
		{in: "system:serviceaccounts:demo:web", ok: false},
		{in: "admin", ok: false},
		{in: "", ok: false},
		{in: " system:serviceaccount:demo:web", ok: false},
	} {
		ns, sa, err := k8sauth.ParseUsername(tc.in)
		if tc.ok != (err == nil) || ns != tc.ns || sa != tc.sa {
			t.Errorf("ParseUsername(%q) = %q, %q, %v", tc.in, ns, sa, err)
		}
		if err != nil && !errors.Is(err, k8sauth.ErrUnauthenticated) {
			t.Errorf("ParseUsername(%q): error %v is not ErrUnauthenticated", tc.in, err)
		}
	}
}

// reviewClient answers TokenReviews with status, recording the specs sent.
func reviewClient(status authnv1.TokenReviewStatus, err error) (*fake.Clientset, *[]authnv1.TokenReviewSpec) {
	var mu sync.Mutex
	var specs []authnv1.TokenReviewSpec
	c := fake.NewClientset()
	c.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview)
		mu.Lock()
		specs = append(specs, tr.Spec)
		mu.Unlock()
		if err != nil {
			return true, nil, err
		}
		return true, &authnv1.TokenReview{Spec: tr.Spec, Status: status}, nil
	})
	return c, &specs
}

func goodStatus() authnv1.TokenReviewStatus {
	return authnv1.TokenReviewStatus{
		Authenticated: true,
		Audiences:     []string{"istio-ca"},
		User: authnv1.UserInfo{
			Username: "system:serviceaccount:demo:web",
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"},
			Extra: map[string]authnv1.ExtraValue{
				"authentication.kubernetes.io/pod-name": {"web-1"},
				"authentication.kubernetes.io/pod-uid":  {"uid-1"},
			},
		},
	}
}

func TestTokenReview(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name        string
		edit        func(*authnv1.TokenReviewStatus)
		apiErr      error
		reason      string
		unavailable bool
	}{
		{name: "accepted"},
		{name: "not authenticated", edit: func(s *authnv1.TokenReviewStatus) { s.Authenticated = false; s.Error = "token expired" }, reason: "rejected"},
		{name: "audiences not ours", edit: func(s *authnv1.TokenReviewStatus) { s.Audiences = []string{"https://kubernetes.default.svc"} }, reason: "audience"},
		{name: "no audiences returned", edit: func(s *authnv1.TokenReviewStatus) { s.Audiences = nil }, reason: "audience"},
		{name: "not in serviceaccounts group", edit: func(s *authnv1.TokenReviewStatus) { s.User.Groups = []string{"system:authenticated"} }, reason: "not_service_account"},
		{name: "a user, not a service account", edit: func(s *authnv1.TokenReviewStatus) { s.User.Username = "alice" }, reason: "not_service_account"},
		{name: "API server unreachable", apiErr: errors.New("dial tcp: connection refused"), reason: "unavailable", unavailable: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := goodStatus()
			if tc.edit != nil {
				tc.edit(&st)
			}
			client, specs := reviewClient(st, tc.apiErr)
			r := &k8sauth.TokenReview{Client: client.AuthenticationV1(), Audiences: []string{"istio-ca"}}
			c, err := r.Authenticate(ctx, "a.token.value")
			if len(*specs) != 1 {
				t.Fatalf("%d reviews sent, want exactly 1 (never retried)", len(*specs))
			}
			if got := (*specs)[0].Audiences; len(got) != 1 || got[0] != "istio-ca" {
				t.Errorf("review audiences = %v, want [istio-ca]", got)
			}
			if tc.reason == "" {
				if err != nil {
					t.Fatal(err)
				}
				want := k8sauth.Caller{Namespace: "demo", ServiceAccount: "web", PodName: "web-1", PodUID: "uid-1", Method: k8sauth.MethodTokenReview}
				if c != want {
					t.Errorf("caller = %+v, want %+v", c, want)
				}
				return
			}
			if got := k8sauth.Reason(err); got != tc.reason {
				t.Errorf("reason = %q (%v), want %q", got, err, tc.reason)
			}
			if errors.Is(err, k8sauth.ErrUnavailable) != tc.unavailable || errors.Is(err, k8sauth.ErrUnauthenticated) == tc.unavailable {
				t.Errorf("err %v: unavailable = %v, want %v", err, errors.Is(err, k8sauth.ErrUnavailable), tc.unavailable)
			}
			if strings.Contains(err.Error(), "a.token.value") {
				t.Error("error contains the token")
			}
		})
	}
}

// Tokens that cannot be valid are never sent: empty, or larger than any
// projected token.
func TestTokenReviewEmptyOrHugeToken(t *testing.T) {
	client, specs := reviewClient(goodStatus(), nil)
	r := &k8sauth.TokenReview{Client: client.AuthenticationV1(), Audiences: []string{"istio-ca"}}
	for _, tok := range []string{"", strings.Repeat("a", k8sauth.MaxTokenBytes+1)} {
		if _, err := r.Authenticate(context.Background(), tok); !errors.Is(err, k8sauth.ErrUnauthenticated) {
			t.Errorf("token of %d bytes: err = %v", len(tok), err)
		}
	}
	if len(*specs) != 0 {
		t.Errorf("%d tokens were sent for review", len(*specs))
	}
}

func newIssuer(t testing.TB) *satoken.Issuer {
	t.Helper()
	is, err := satoken.New("https://issuer.test")
	if err != nil {
		t.Fatal(err)
	}
	return is
}

// issuerKeys is is's JWKS, loaded from a file.
func issuerKeys(t testing.TB, is *satoken.Issuer) *k8sauth.KeySet {
	t.Helper()
	path := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(path, is.JWKS(), 0o644); err != nil {
		t.Fatal(err)
	}
	ks := k8sauth.NewFileKeySet(path)
	if err := ks.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	return ks
}

func jwksAuth(t testing.TB, is *satoken.Issuer, now time.Time) *k8sauth.JWKS {
	t.Helper()
	ks := issuerKeys(t, is)
	return &k8sauth.JWKS{Issuer: is.URL, Audiences: []string{"istio-ca"}, Keys: ks, Now: func() time.Time { return now }}
}

// mintToken has is sign base as changed by edit (nil: unchanged).
func mintToken(t testing.TB, is *satoken.Issuer, base satoken.Claims, edit func(*satoken.Claims)) string {
	t.Helper()
	if edit != nil {
		edit(&base)
	}
	tok, err := is.Token(base)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// editPayload replaces old with new in a token's base64url payload.
func editPayload(t *testing.T, payload, old, new string) string {
	t.Helper()
	raw, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString([]byte(strings.ReplaceAll(string(raw), old, new)))
}

func TestJWKS(t *testing.T) {
	is := newIssuer(t)
	other := newIssuer(t)
	now := time.Now().Truncate(time.Second)
	auth := jwksAuth(t, is, now)
	base := satoken.Claims{Namespace: "demo", ServiceAccount: "web", PodName: "web-1", PodUID: "uid-1", Audiences: []string{"istio-ca"}, Now: now}
	mint := func(is *satoken.Issuer, edit func(*satoken.Claims)) string { return mintToken(t, is, base, edit) }
	good := mint(is, nil)
	parts := strings.Split(good, ".")
	for _, tc := range []struct {
		name   string
		token  string
		reason string
	}{
		{name: "accepted", token: good},
		{name: "another issuer's key", token: mint(other, nil), reason: "signature"},
		{name: "expired", token: mint(is, func(c *satoken.Claims) { c.Now = now.Add(-2 * time.Hour) }), reason: "expired"},
		{name: "not yet valid", token: mint(is, func(c *satoken.Claims) { c.Now = now.Add(time.Hour) }), reason: "not_yet_valid"},
		{name: "another audience", token: mint(is, func(c *satoken.Claims) { c.Audiences = []string{"https://kubernetes.default.svc"} }), reason: "audience"},
		{name: "no audience", token: mint(is, func(c *satoken.Claims) { c.Audiences = nil }), reason: "audience"},
		{name: "payload not JSON", token: parts[0] + "." + parts[2] + "." + parts[2], reason: "malformed"},
		{name: "payload edited", token: parts[0] + "." + editPayload(t, parts[1], "web", "admin") + "." + parts[2], reason: "signature"},
		{name: "garbage", token: "garbage", reason: "malformed"},
		{name: "empty", token: "", reason: "no_token"},
		{name: "huge", token: strings.Repeat("a", k8sauth.MaxTokenBytes+1), reason: "malformed"},
		{name: "unsigned (alg none)", token: "eyJhbGciOiJub25lIn0." + parts[1] + ".", reason: "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := auth.Authenticate(context.Background(), tc.token)
			if tc.reason == "" {
				if err != nil {
					t.Fatal(err)
				}
				want := k8sauth.Caller{Namespace: "demo", ServiceAccount: "web", PodName: "web-1", PodUID: "uid-1", Expiry: now.Add(time.Hour), Method: k8sauth.MethodJWKS}
				if c != want {
					t.Errorf("caller = %+v, want %+v", c, want)
				}
				return
			}
			if got := k8sauth.Reason(err); got != tc.reason || !errors.Is(err, k8sauth.ErrUnauthenticated) {
				t.Errorf("err = %v (reason %q), want reason %q", err, got, tc.reason)
			}
		})
	}
	t.Run("wrong issuer claim", func(t *testing.T) {
		liar, _ := satoken.New("https://other.test")
		a := jwksAuth(t, liar, now)
		a.Issuer = is.URL
		_, err := a.Authenticate(context.Background(), mint(liar, nil))
		if got := k8sauth.Reason(err); got != "issuer" {
			t.Errorf("err = %v, want reason issuer", err)
		}
	})
}

func TestKeySetPicksUpRotatedKey(t *testing.T) {
	old, next := newIssuer(t), newIssuer(t)
	path := filepath.Join(t.TempDir(), "jwks.json")
	os.WriteFile(path, old.JWKS(), 0o644)
	ks := k8sauth.NewFileKeySet(path)
	auth := &k8sauth.JWKS{Issuer: old.URL, Audiences: []string{"istio-ca"}, Keys: ks}
	tok := func(is *satoken.Issuer) string {
		s, _ := is.Token(satoken.Claims{Namespace: "a", ServiceAccount: "b", Audiences: []string{"istio-ca"}})
		return s
	}
	if _, err := auth.Authenticate(context.Background(), tok(old)); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, next.JWKS(), 0o644)
	// The new key ID is unknown: the set is read again (at most once a
	// second), so poll until it is.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := auth.Authenticate(context.Background(), tok(next))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotated key never accepted: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestKeySetRefusesPrivateKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "jwks.json")
	os.WriteFile(path, []byte(`{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","d":"jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}]}`), 0o644)
	if err := k8sauth.NewFileKeySet(path).Load(context.Background()); err == nil || !strings.Contains(err.Error(), "private key") {
		t.Errorf("err = %v, want a refusal of the private key", err)
	}
}

// countingAuth counts calls and answers with a fixed result.
type countingAuth struct {
	calls  atomic.Int32
	caller k8sauth.Caller
	err    error
	block  chan struct{}
}

func (c *countingAuth) Authenticate(ctx context.Context, token string) (k8sauth.Caller, error) {
	c.calls.Add(1)
	if c.block != nil {
		<-c.block
	}
	return c.caller, c.err
}

func TestCache(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	ctx := context.Background()

	t.Run("hit within TTL, miss after", func(t *testing.T) {
		inner := &countingAuth{caller: k8sauth.Caller{Namespace: "a", ServiceAccount: "b"}}
		c := k8sauth.NewCache(inner, k8sauth.CacheConfig{TTL: 30 * time.Second, Size: 10, Now: clock})
		c.Authenticate(ctx, "t1")
		c.Authenticate(ctx, "t1")
		if inner.calls.Load() != 1 {
			t.Fatalf("%d reviews, want 1", inner.calls.Load())
		}
		now = now.Add(31 * time.Second)
		c.Authenticate(ctx, "t1")
		if inner.calls.Load() != 2 {
			t.Fatalf("%d reviews after TTL, want 2", inner.calls.Load())
		}
	})
	t.Run("never outlives the token", func(t *testing.T) {
		inner := &countingAuth{caller: k8sauth.Caller{Namespace: "a", ServiceAccount: "b", Expiry: now.Add(5 * time.Second)}}
		c := k8sauth.NewCache(inner, k8sauth.CacheConfig{TTL: time.Minute, Size: 10, Now: clock})
		c.Authenticate(ctx, "t2")
		now = now.Add(6 * time.Second)
		c.Authenticate(ctx, "t2")
		if inner.calls.Load() != 2 {
			t.Fatalf("%d reviews, want 2: the entry outlived its token", inner.calls.Load())
		}
	})
	t.Run("failures are not cached", func(t *testing.T) {
		inner := &countingAuth{err: errors.New("no")}
		c := k8sauth.NewCache(inner, k8sauth.CacheConfig{TTL: time.Minute, Size: 10, Now: clock})
		c.Authenticate(ctx, "bad")
		c.Authenticate(ctx, "bad")
		if inner.calls.Load() != 2 {
			t.Fatalf("%d reviews, want 2", inner.calls.Load())
		}
	})
	t.Run("bounded", func(t *testing.T) {
		inner := &countingAuth{caller: k8sauth.Caller{Namespace: "a", ServiceAccount: "b"}}
		c := k8sauth.NewCache(inner, k8sauth.CacheConfig{TTL: time.Minute, Size: 100, Now: clock})
		for i := range 1000 {
			c.Authenticate(ctx, fmt.Sprint("token-", i))
		}
		if c.Len() > 100 {
			t.Errorf("cache holds %d entries, bound is 100", c.Len())
		}
	})
	t.Run("concurrent requests share one review", func(t *testing.T) {
		inner := &countingAuth{caller: k8sauth.Caller{Namespace: "a", ServiceAccount: "b"}, block: make(chan struct{})}
		c := k8sauth.NewCache(inner, k8sauth.CacheConfig{Now: clock}) // no caching: only sharing
		var wg sync.WaitGroup
		for range 20 {
			wg.Add(1)
			go func() { defer wg.Done(); c.Authenticate(ctx, "same") }()
		}
		// Wait until the first review is under way, then release it.
		deadline := time.Now().Add(5 * time.Second)
		for inner.calls.Load() == 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		close(inner.block)
		wg.Wait()
		if n := inner.calls.Load(); n >= 20 {
			t.Errorf("%d reviews for 20 concurrent requests with one token", n)
		}
	})
}

// FuzzJWKS feeds arbitrary tokens to offline verification: no panic, and
// nothing accepted unless it is a token the issuer really signed.
func FuzzJWKS(f *testing.F) {
	is := newIssuer(f)
	now := time.Now()
	auth := jwksAuth(f, is, now)
	good, _ := is.Token(satoken.Claims{Namespace: "demo", ServiceAccount: "web", Audiences: []string{"istio-ca"}, Now: now})
	f.Add(good)
	f.Add("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
	f.Add("a.b.c")
	f.Add("")
	f.Fuzz(func(t *testing.T, token string) {
		c, err := auth.Authenticate(context.Background(), token)
		if err != nil {
			if !errors.Is(err, k8sauth.ErrUnauthenticated) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if token != good || c.Namespace != "demo" || c.ServiceAccount != "web" {
			t.Fatalf("accepted a token the issuer did not sign as is: %+v", c)
		}
	})
}
