package k8sauth_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"

	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/internal/poll"
)

// gate is an Authenticator whose checks block until released, recording
// the order they started in and the most that ran at once.
type gate struct {
	mu      sync.Mutex
	started []string
	running int
	most    int
	release chan struct{}
	ctxErrs chan error
	ctxs    []context.Context
}

func newGate() *gate {
	return &gate{release: make(chan struct{}), ctxErrs: make(chan error, 100)}
}

func (g *gate) Authenticate(ctx context.Context, token string) (k8sauth.Caller, error) {
	g.mu.Lock()
	g.started = append(g.started, token)
	g.ctxs = append(g.ctxs, ctx)
	g.running++
	g.most = max(g.most, g.running)
	g.mu.Unlock()
	defer func() { g.mu.Lock(); g.running--; g.mu.Unlock() }()
	select {
	case <-g.release:
		return k8sauth.Caller{Namespace: "demo", ServiceAccount: token}, nil
	case <-ctx.Done():
		g.ctxErrs <- ctx.Err()
		return k8sauth.Caller{}, ctx.Err()
	}
}

func (g *gate) startedCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.started)
}

func TestFair(t *testing.T) {
	t.Run("at most Concurrency at once", func(t *testing.T) {
		g := newGate()
		f := &k8sauth.Fair{Auth: g, Concurrency: 3}
		var wg sync.WaitGroup
		for range 10 {
			wg.Add(1)
			go func() { defer wg.Done(); f.Authenticate(context.Background(), "t") }()
		}
		poll.Until(t, "3 checks to start", func() bool { return g.startedCount() == 3 })
		close(g.release)
		wg.Wait()
		if g.most != 3 || len(g.started) != 10 {
			t.Errorf("%d checks ran, at most %d at once; want 10, at most 3", len(g.started), g.most)
		}
	})

	t.Run("peers take turns", func(t *testing.T) {
		g := newGate()
		f := &k8sauth.Fair{Auth: g, Concurrency: 1}
		var wg sync.WaitGroup
		check := func(peer, token string) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				f.Authenticate(k8sauth.WithPeer(context.Background(), peer), token)
			}()
		}
		check("busy", "first")
		poll.Until(t, "the first check to start", func() bool { return g.startedCount() == 1 })
		// A busy peer queues five, then a quiet one queues one: the quiet
		// one goes next after the busy one's first, not after all five.
		for i, tok := range []string{"busy-1", "busy-2", "busy-3", "busy-4", "busy-5"} {
			check("busy", tok)
			waitQueued(t, f, i+1)
		}
		check("quiet", "quiet-1")
		waitQueued(t, f, 6)
		close(g.release)
		wg.Wait()
		want := []string{"first", "busy-1", "quiet-1", "busy-2", "busy-3", "busy-4", "busy-5"}
		if !equal(g.started, want) {
			t.Errorf("order %v, want %v", g.started, want)
		}
	})

	t.Run("a peer's queue is bounded", func(t *testing.T) {
		g := newGate()
		f := &k8sauth.Fair{Auth: g, Concurrency: 1, PerPeer: 2}
		ctx := k8sauth.WithPeer(context.Background(), "flood")
		var wg sync.WaitGroup
		for range 3 {
			wg.Add(1)
			go func() { defer wg.Done(); f.Authenticate(ctx, "t") }()
		}
		waitQueued(t, f, 2)
		_, err := f.Authenticate(ctx, "t")
		if !errors.Is(err, k8sauth.ErrUnavailable) {
			t.Errorf("a third waiting check of one peer: %v, want unavailable", err)
		}
		// Another peer still gets in line.
		wg.Add(1)
		go func() { defer wg.Done(); f.Authenticate(k8sauth.WithPeer(context.Background(), "other"), "t") }()
		waitQueued(t, f, 3)
		close(g.release)
		wg.Wait()
	})

	t.Run("a request that leaves gives up its place", func(t *testing.T) {
		g := newGate()
		f := &k8sauth.Fair{Auth: g, Concurrency: 1}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); f.Authenticate(context.Background(), "holder") }()
		poll.Until(t, "the holder to start", func() bool { return g.startedCount() == 1 })
		ctx, cancel := context.WithCancel(context.Background())
		left := make(chan error, 1)
		go func() { _, err := f.Authenticate(ctx, "leaver"); left <- err }()
		waitQueued(t, f, 1)
		cancel()
		if err := <-left; !errors.Is(err, k8sauth.ErrUnavailable) {
			t.Errorf("leaver: %v, want unavailable", err)
		}
		waitQueued(t, f, 0)
		wg.Add(1)
		go func() { defer wg.Done(); f.Authenticate(context.Background(), "next") }()
		waitQueued(t, f, 1)
		close(g.release)
		wg.Wait()
		if want := []string{"holder", "next"}; !equal(g.started, want) {
			t.Errorf("started %v, want %v: the leaver was checked anyway", g.started, want)
		}
	})
}

// waitQueued waits until n checks wait for a slot, as Fair's metrics say.
func waitQueued(t *testing.T, f *k8sauth.Fair, n int) {
	t.Helper()
	poll.Until(t, "checks to queue", func() bool { return f.Queued() == n })
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestCacheRefusals(t *testing.T) {
	ctx := context.Background()
	t.Run("a refusal by the API server is remembered for NegativeTTL", func(t *testing.T) {
		now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
		client, specs := reviewClient(authnv1.TokenReviewStatus{Authenticated: false, Error: "invalid bearer token"}, nil)
		c := k8sauth.NewCache(&k8sauth.TokenReview{Client: client.AuthenticationV1(), Audiences: []string{"istio-ca"}},
			k8sauth.CacheConfig{TTL: time.Minute, NegativeTTL: 10 * time.Second, Size: 10, Now: func() time.Time { return now }})
		for range 3 {
			if _, err := c.Authenticate(ctx, "bad"); k8sauth.Reason(err) != "rejected" {
				t.Fatalf("err = %v, want the API server's refusal", err)
			}
		}
		if len(*specs) != 1 {
			t.Fatalf("%d reviews for one bad token asked three times, want 1", len(*specs))
		}
		now = now.Add(11 * time.Second)
		c.Authenticate(ctx, "bad")
		if len(*specs) != 2 {
			t.Fatalf("%d reviews after NegativeTTL, want 2", len(*specs))
		}
	})
	t.Run("an unreachable API server is not remembered", func(t *testing.T) {
		client, specs := reviewClient(authnv1.TokenReviewStatus{}, errors.New("connection refused"))
		c := k8sauth.NewCache(&k8sauth.TokenReview{Client: client.AuthenticationV1(), Audiences: []string{"istio-ca"}},
			k8sauth.CacheConfig{TTL: time.Minute, NegativeTTL: time.Minute, Size: 10})
		for range 2 {
			if _, err := c.Authenticate(ctx, "tok"); !errors.Is(err, k8sauth.ErrUnavailable) {
				t.Fatalf("err = %v, want unavailable", err)
			}
		}
		if len(*specs) != 2 {
			t.Fatalf("%d reviews, want 2: an outage must not stick to a token", len(*specs))
		}
	})
	t.Run("the shared check ends when the last waiter leaves", func(t *testing.T) {
		g := newGate()
		c := k8sauth.NewCache(g, k8sauth.CacheConfig{})
		ctx1, cancel1 := context.WithCancel(ctx)
		ctx2, cancel2 := context.WithCancel(ctx)
		var done sync.WaitGroup
		var first atomic.Value
		done.Add(2)
		go func() { defer done.Done(); _, err := c.Authenticate(ctx1, "tok"); first.Store(err) }()
		poll.Until(t, "the check to start", func() bool { return g.startedCount() == 1 })
		go func() { defer done.Done(); c.Authenticate(ctx2, "tok") }()
		poll.Until(t, "the second request to join", func() bool { return c.Waiting() == 2 })
		cancel1()
		poll.Until(t, "the first request to leave", func() bool { return first.Load() != nil })
		g.mu.Lock()
		checkCtx := g.ctxs[0]
		g.mu.Unlock()
		if err := checkCtx.Err(); err != nil {
			t.Fatalf("the check was cancelled (%v) while a request still waited for it", err)
		}
		cancel2()
		select {
		case <-g.ctxErrs:
		case <-time.After(10 * time.Second):
			t.Fatal("the check went on with no request waiting for it")
		}
		done.Wait()
		if err, _ := first.Load().(error); !errors.Is(err, k8sauth.ErrUnavailable) {
			t.Errorf("a request that left: %v, want unavailable", err)
		}
	})
}
