package rotation_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/rotation"
)

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

type fixture struct {
	dir    *keys.StateDir
	src    *keys.Source
	led    *ledger.Ledger
	clock  *clock
	serial int
}

func setup(t *testing.T) (*fixture, *rotation.Rotator) {
	t.Helper()
	ctx := context.Background()
	dir, err := keys.OpenStateDir(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dir.Close() })
	m, _, err := dir.LoadOrCreate(func() (*keys.Material, error) { return keys.Generate(keys.Options{TrustDomain: "cluster.local"}) })
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{dir: dir, src: &keys.Source{}, clock: &clock{now: time.Now().Truncate(time.Microsecond)}}
	is, err := m.Issuer(f.clock.Now())
	if err != nil {
		t.Fatal(err)
	}
	f.src.Set(is)
	f.led, err = ledger.Open(ctx, ledger.Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "ledger.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.led.Close() })
	r, err := rotation.New(rotation.Config{
		Store: dir, Source: f.src, Algorithm: keys.ECDSAP256, Ledger: f.led,
		Sync: 30 * time.Second, Propagation: 2 * time.Minute, Now: f.clock.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	return f, r
}

// issue records a certificate issued now, valid for ttl.
func (f *fixture) issue(t *testing.T, ttl time.Duration) {
	t.Helper()
	f.serial++
	now := f.clock.Now()
	err := f.led.Record(context.Background(), ledger.Record{
		Serial: fmt.Sprintf("%x", f.serial), SPIFFEID: "spiffe://cluster.local/ns/shop/sa/web", Namespace: "shop", ServiceAccount: "web",
		NotBefore: now, NotAfter: now.Add(ttl), IssuedAt: now, AuthMethod: "tokenreview",
	})
	if err != nil {
		t.Fatal(err)
	}
}

func failed(st *rotation.Status) map[string]bool {
	out := map[string]bool{}
	for _, c := range st.Checks {
		if !c.Passed {
			out[c.Name] = true
		}
	}
	return out
}

func TestRotationChecksGateEachStep(t *testing.T) {
	f, r := setup(t)
	ctx := context.Background()
	oldRoot := f.src.Issuer().Root()
	f.issue(t, time.Hour) // a workload holds a certificate from the old root

	st, err := r.Advance(ctx, keys.StageNone, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	if st.Stage != keys.StagePrepared || len(f.src.Issuer().Roots()) != 1 {
		t.Fatalf("after prepare: stage %s, %d roots trusted; want prepared, 1", st.Stage, len(f.src.Issuer().Roots()))
	}
	newRoot := st.NextRoot

	st, err = r.Advance(ctx, keys.StagePrepared, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	if got := f.src.Issuer().Roots(); len(got) != 2 || !got[1].Equal(newRoot) || !f.src.Issuer().Root().Equal(oldRoot) {
		t.Fatal("after distribute: want both roots trusted and the old root signing")
	}
	// Switch waits for replicas, propagation and the certificate from
	// before distribution.
	if want := map[string]bool{"replicas": true, "propagation": true, "workloads": true}; fmt.Sprint(failed(st)) != fmt.Sprint(want) {
		t.Fatalf("switch checks failing: %v, want %v", failed(st), want)
	}
	_, err = r.Advance(ctx, keys.StageDistributed, false, "test")
	var ce *rotation.ChecksError
	if !errors.As(err, &ce) || len(ce.Failed) != 3 {
		t.Fatalf("early switch: err = %v, want a ChecksError with 3 failed checks", err)
	}
	if !f.src.Issuer().Root().Equal(oldRoot) {
		t.Fatal("a refused switch changed the signing root")
	}

	f.clock.advance(2 * time.Minute)
	f.issue(t, time.Hour) // renewed after distribution: carries both roots
	st, err = r.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]bool{"workloads": true}; fmt.Sprint(failed(st)) != fmt.Sprint(want) {
		t.Fatalf("after propagation: failing %v, want %v", failed(st), want)
	}
	f.clock.advance(58*time.Minute + time.Second) // the first certificate lapses
	st, err = r.Advance(ctx, keys.StageDistributed, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	if st.Stage != keys.StageSwitched || !f.src.Issuer().Root().Equal(newRoot) || len(f.src.Issuer().Roots()) != 2 {
		t.Fatal("after switch: want the new root signing and both trusted")
	}

	// Retire waits for every certificate from the old root (the one issued
	// before the switch lapses in about two minutes).
	f.clock.advance(time.Minute)
	if _, err := r.Advance(ctx, keys.StageSwitched, false, "test"); !errors.As(err, &ce) {
		t.Fatalf("early retire: err = %v, want ChecksError", err)
	}
	f.clock.advance(2 * time.Minute)
	st, err = r.Advance(ctx, keys.StageSwitched, false, "test")
	if err != nil {
		t.Fatal(err)
	}
	if st.Stage != keys.StageNone || len(f.src.Issuer().Roots()) != 1 || !f.src.Issuer().Roots()[0].Equal(newRoot) {
		t.Fatal("after retire: want the new root alone")
	}

	// What was stored is what a restarted CA loads.
	m, err := f.dir.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m.RotationStage() != keys.StageNone || !m.RootCert.Equal(newRoot) || len(m.Roots) != 1 {
		t.Fatal("stored CA is not the rotated one")
	}
}

func TestRotationStageMismatchAndForce(t *testing.T) {
	f, r := setup(t)
	ctx := context.Background()
	if _, err := r.Advance(ctx, keys.StagePrepared, false, "test"); !errors.Is(err, rotation.ErrStageChanged) {
		t.Fatalf("advance from the wrong stage: err = %v, want ErrStageChanged", err)
	}
	if _, err := r.Advance(ctx, keys.StageNone, false, "test"); err != nil {
		t.Fatal(err)
	}
	// A second operator who also saw "none" must not prepare again.
	if _, err := r.Advance(ctx, keys.StageNone, false, "test"); !errors.Is(err, rotation.ErrStageChanged) {
		t.Fatalf("double prepare: err = %v, want ErrStageChanged", err)
	}
	if _, err := r.Advance(ctx, keys.StagePrepared, false, "test"); err != nil {
		t.Fatal(err)
	}
	st, err := r.Advance(ctx, keys.StageDistributed, true, "test")
	if err != nil {
		t.Fatalf("forced switch: %v", err)
	}
	if st.Stage != keys.StageSwitched {
		t.Fatalf("forced switch: stage %s", st.Stage)
	}
	if _, err := r.Abort(ctx, keys.StageSwitched, "test"); !errors.Is(err, keys.ErrStage) {
		t.Fatalf("abort after switch: err = %v, want keys.ErrStage", err)
	}
	_ = f
}

func TestRotationAbortRestoresOldBundle(t *testing.T) {
	f, r := setup(t)
	ctx := context.Background()
	oldRoot := f.src.Issuer().Root()
	for _, from := range []keys.Stage{keys.StageNone, keys.StagePrepared} {
		if _, err := r.Advance(ctx, from, false, "test"); err != nil {
			t.Fatal(err)
		}
	}
	st, err := r.Abort(ctx, keys.StageDistributed, "test")
	if err != nil {
		t.Fatal(err)
	}
	if st.Stage != keys.StageNone || len(f.src.Issuer().Roots()) != 1 || !f.src.Issuer().Roots()[0].Equal(oldRoot) {
		t.Fatal("after abort: want the old root alone, no rotation")
	}
}
