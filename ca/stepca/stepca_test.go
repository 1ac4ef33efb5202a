package stepca_test

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/stepca"
	"github.com/meshid/meshid/internal/steptest"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func client(t *testing.T, s *steptest.CA, provisioner, password string) *stepca.Client {
	t.Helper()
	c, err := stepca.New(stepca.Config{URL: s.URL, Roots: []*x509.Certificate{s.Root}, Provisioner: provisioner, Password: []byte(password), TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// upstream is meshid-ca's use of a step-ca: P-256 intermediates of ttl.
func upstream(c *stepca.Client, s *steptest.CA, ttl time.Duration) *keys.UpstreamCA {
	return &keys.UpstreamCA{Upstream: c, Roots: []*x509.Certificate{s.Root}, TrustDomain: td, Algorithm: keys.ECDSAP256, TTL: ttl}
}

// TestIntermediateFromStepCA: a real step-ca signs meshid's intermediate;
// meshid checks it and signs workloads under step-ca's root with it.
func TestIntermediateFromStepCA(t *testing.T) {
	s := steptest.Start(t, steptest.Options{})
	ctx := context.Background()
	c := client(t, s, s.Provisioner.Name, s.Provisioner.Password)
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	m, err := upstream(c, s, 48*time.Hour).Intermediate(ctx, now, nil)
	if err != nil {
		t.Fatalf("intermediate from step-ca: %v", err)
	}
	if len(m.Chain) != 1 || !m.Chain[0].Equal(s.Intermediate) || len(m.Roots) != 1 || !m.Roots[0].Equal(s.Root) || m.RootKey != nil {
		t.Errorf("material: chain %d, roots %d", len(m.Chain), len(m.Roots))
	}
	if got := m.CACert.NotAfter.Sub(now); got < 47*time.Hour || got > 49*time.Hour {
		t.Errorf("lifetime %s, asked 48h", got)
	}
	if _, err := m.Issuer(now); err != nil {
		t.Errorf("issuer: %v", err)
	}
	// Round trip through the stored form (the Secret or the state dir).
	files, err := m.Files()
	if err != nil {
		t.Fatal(err)
	}
	back, err := keys.ParseFiles(files)
	if err != nil || !back.Equal(m) {
		t.Errorf("stored form: %v", err)
	}
}

func TestStepCARefusals(t *testing.T) {
	s := steptest.Start(t, steptest.Options{})
	ctx := context.Background()
	for name, tc := range map[string]struct{ provisioner, password, want string }{
		"wrong password":      {s.Provisioner.Name, "not-the-password", "wrong password? failed to decrypt JWE: invalid password"},
		"no such provisioner": {"nobody", s.Provisioner.Password, "no provisioner of that name"},
	} {
		err := client(t, s, tc.provisioner, tc.password).Check(ctx)
		if !errors.Is(err, stepca.ErrConfig) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), s.URL) {
			t.Errorf("%s: %v, want ErrConfig saying %q and naming step-ca", name, err, tc.want)
		}
	}
	if _, err := stepca.New(stepca.Config{URL: "http://" + strings.TrimPrefix(s.URL, "https://"), Roots: []*x509.Certificate{s.Root}, Provisioner: "p", Password: []byte("x"), TrustDomain: td}); err == nil {
		t.Error("an http:// step-ca URL was accepted")
	}
}

// TestStepInitPKIRefused: under a PKI made by `step ca init` (root path
// length 1, step-ca's intermediate 0) step-ca signs meshid's intermediate,
// but no workload under it would verify: meshid refuses it.
func TestStepInitPKIRefused(t *testing.T) {
	s := steptest.Start(t, steptest.Options{StepInitPathLens: true})
	c := client(t, s, s.Provisioner.Name, s.Provisioner.Password)
	_, err := upstream(c, s, time.Hour).Intermediate(context.Background(), time.Now(), nil)
	if !errors.Is(err, keys.ErrUpstreamIntermediate) || !strings.Contains(err.Error(), "path length") {
		t.Fatalf("%v, want a refusal naming the path length", err)
	}
}

// TestRenewalThroughStepCA: the renewer asks step-ca for a new
// intermediate when the current one is due; with step-ca down it keeps the
// current one and says so, and renews once step-ca is back.
func TestRenewalThroughStepCA(t *testing.T) {
	s := steptest.Start(t, steptest.Options{})
	ctx := context.Background()
	c := client(t, s, s.Provisioner.Name, s.Provisioner.Password)
	up := upstream(c, s, 30*time.Minute)
	m, err := up.Intermediate(ctx, time.Now(), nil)
	if err != nil {
		t.Fatal(err)
	}
	store, err := keys.OpenStateDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if _, _, err := store.LoadOrCreate(func() (*keys.Material, error) { return m, nil }); err != nil {
		t.Fatal(err)
	}
	var src keys.Source
	due := m.RenewAt().Add(time.Second)
	var results []error
	r := &keys.Renewer{Store: store, Source: &src, Upstream: up, Now: func() time.Time { return due }, Renewed: func(err error) { results = append(results, err) }}

	s.Stop()
	got, err := r.Check(ctx, m)
	if err == nil || got != m || src.Issuer() != nil {
		t.Fatalf("step-ca down: %v (kept the current CA: %v)", err, got == m)
	}
	if !strings.Contains(err.Error(), s.URL) {
		t.Errorf("the error does not name step-ca: %v", err)
	}
	s = s.Restart(t)
	got, err = r.Check(ctx, m)
	if err != nil {
		t.Fatalf("step-ca back: %v", err)
	}
	if got.CACert.Equal(m.CACert) || !got.Roots[0].Equal(s.Root) || src.Issuer() == nil {
		t.Fatal("not renewed through step-ca")
	}
	stored, err := store.Load(ctx)
	if err != nil || !stored.Equal(got) {
		t.Errorf("the renewed intermediate is not what the store holds: %v", err)
	}
	if len(results) != 2 || results[0] == nil || results[1] != nil {
		t.Errorf("renewal results %v, want a failure then a success", results)
	}
}

// TestStepCARootRotation: step-ca's operators move it to a new root (here a
// second step-ca stands for the first one after the move). With the new
// root added to meshid's roots (--step-root-file), meshid serves both; an
// intermediate under the new root is refused until that bundle has been
// served for the propagation time, then used; and the old root stays in
// the bundle while an intermediate under it is in use.
func TestStepCARootRotation(t *testing.T) {
	old, next := steptest.Start(t, steptest.Options{}), steptest.Start(t, steptest.Options{})
	ctx := context.Background()
	now := time.Now()
	m, err := upstream(client(t, old, old.Provisioner.Name, old.Provisioner.Password), old, 24*time.Hour).Intermediate(ctx, now, nil)
	if err != nil {
		t.Fatal(err)
	}

	both := []*x509.Certificate{old.Root, next.Root}
	c, err := stepca.New(stepca.Config{URL: next.URL, Roots: both, Provisioner: next.Provisioner.Name, Password: []byte(next.Provisioner.Password), TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	up := &keys.UpstreamCA{Upstream: c, Roots: both, Propagation: time.Hour, Since: now, TrustDomain: td, Algorithm: keys.ECDSAP256, TTL: 24 * time.Hour}
	if b := up.Bundle(m); len(b) != 2 || !b[0].Equal(old.Root) || !b[1].Equal(next.Root) {
		t.Errorf("bundle while rotating: %d roots, want the old and the new", len(b))
	}
	if _, err := up.Intermediate(ctx, now.Add(time.Minute), m); !errors.Is(err, keys.ErrRootNotPropagated) {
		t.Fatalf("under the new root a minute after serving it: %v, want ErrRootNotPropagated", err)
	}
	switched, err := up.Intermediate(ctx, now.Add(2*time.Hour), m)
	if err != nil {
		t.Fatalf("under the new root after the propagation time: %v", err)
	}
	if len(switched.Chain) != 1 || !switched.Chain[0].Equal(next.Intermediate) || len(switched.Roots) != 2 {
		t.Errorf("switched intermediate: chain %d, roots %d", len(switched.Chain), len(switched.Roots))
	}
	// The old root leaves --step-root-file: gone from the bundle of the new
	// intermediate, kept for the old one while it is still in use.
	after := &keys.UpstreamCA{Upstream: c, Roots: []*x509.Certificate{next.Root}, TrustDomain: td}
	if b := after.Bundle(switched); len(b) != 1 || !b[0].Equal(next.Root) {
		t.Errorf("bundle after the old root is dropped: %d roots", len(b))
	}
	if b := after.Bundle(m); len(b) != 2 {
		t.Errorf("the old intermediate's root left the bundle while it is in use (%d roots)", len(b))
	}
}

// TestProvisionerKeyReadAgainAfterRefusal: once step-ca refuses a token
// (here: the client's key is another step-ca's, as after the provisioner
// was re-created), the client reads the provisioner's key again, and the
// next attempt succeeds.
func TestProvisionerKeyReadAgainAfterRefusal(t *testing.T) {
	a, b := steptest.Start(t, steptest.Options{}), steptest.Start(t, steptest.Options{})
	ctx := context.Background()
	// One client for b, whose cached key is a's: point it at a first.
	mixed, err := stepca.New(stepca.Config{URL: a.URL, Roots: []*x509.Certificate{a.Root, b.Root}, Provisioner: a.Provisioner.Name, Password: []byte(a.Provisioner.Password), TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	if err := mixed.Check(ctx); err != nil {
		t.Fatal(err)
	}
	moved := stepca.Retarget(mixed, b.URL, []byte(b.Provisioner.Password))
	up := &keys.UpstreamCA{Upstream: moved, Roots: []*x509.Certificate{b.Root}, TrustDomain: td, Algorithm: keys.ECDSAP256, TTL: time.Hour}
	if _, err := up.Intermediate(ctx, time.Now(), nil); err == nil || !strings.Contains(err.Error(), "read again") {
		t.Fatalf("a token from a stale provisioner key: %v, want a refusal saying the key is read again", err)
	}
	if _, err := up.Intermediate(ctx, time.Now(), nil); err != nil {
		t.Fatalf("the next attempt, with the key read again: %v", err)
	}
}
