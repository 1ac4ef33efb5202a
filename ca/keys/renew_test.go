package keys

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/kubetest"
)

// leafFrom issues a workload certificate from src's current issuer.
func leafFrom(t *testing.T, src *Source, at time.Time) *x509.Certificate {
	t.Helper()
	a, err := ca.New(ca.Config{Issuers: src, Now: func() time.Time { return at }})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c, err := a.Issue(ca.Request{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web"), PublicKey: key.Public(), TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	return c.Leaf
}

func verifies(leaf *x509.Certificate, inter, root *x509.Certificate, at time.Time) error {
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	inters.AddCert(inter)
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: at})
	return err
}

// TestRenewerStateDir: the intermediate is replaced once a third of its
// life is left, under the same root; the state directory holds the new one
// (a restart keeps it); certificates issued before still verify.
func TestRenewerStateDir(t *testing.T) {
	dir, err := OpenStateDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	m, _, err := dir.LoadOrCreate(func() (*Material, error) {
		return Generate(Options{TrustDomain: "cluster.local", IntermediateTTL: 3 * time.Hour})
	})
	if err != nil {
		t.Fatal(err)
	}
	src := &Source{}
	is, _ := m.Issuer(time.Now())
	src.Set(is)
	now := time.Now()
	issuedAt := now
	before := leafFrom(t, src, now)
	oldInter := m.CACert

	r := &Renewer{Store: dir, Source: src, Algorithm: ECDSAP256, TTL: 3 * time.Hour, Now: func() time.Time { return now }}
	got, err := r.Check(context.Background(), m)
	if err != nil || got != m {
		t.Fatalf("renewed %v before it was due (%v)", got != m, err)
	}
	now = m.RenewAt().Add(time.Second)
	var renewed int
	r.Renewed = func(err error) {
		if err == nil {
			renewed++
		}
	}
	got, err = r.Check(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case renewed != 1 || got.CACert.Equal(oldInter):
		t.Fatal("not renewed when due")
	case !got.RootCert.Equal(m.RootCert):
		t.Fatal("the root changed")
	case src.Issuer().Certificate() != got.CACert:
		t.Error("the new intermediate does not sign")
	case !got.CACert.NotAfter.After(oldInter.NotAfter):
		t.Errorf("new intermediate lapses at %s, not after the old one's %s", got.CACert.NotAfter, oldInter.NotAfter)
	}
	if err := verifies(leafFrom(t, src, now), got.CACert, m.RootCert, now); err != nil {
		t.Errorf("a certificate from the new intermediate does not verify: %v", err)
	}
	stored, err := dir.Load(context.Background())
	if err != nil || !stored.CACert.Equal(got.CACert) || !stored.RootCert.Equal(m.RootCert) {
		t.Fatalf("the state directory holds another CA (%v)", err)
	}
	// Workloads holding certificates from before still chain to the root
	// the store and the bundle now hold.
	if err := verifies(before, oldInter, stored.Roots[len(stored.Roots)-1], issuedAt); err != nil {
		t.Errorf("a certificate from the old intermediate no longer verifies against the stored root: %v", err)
	}
}

// TestRenewerSecretReplicas: two replicas sharing a Secret on a real
// kube-apiserver both find the intermediate due; one renews, the other
// finds its copy stale and adopts the renewed CA: both sign with the same
// new intermediate, and the Secret never swings back.
func TestRenewerSecretReplicas(t *testing.T) {
	c := kubetest.Start(t)
	c.ServiceAccount(t, "meshid-system", "meshid-ca")
	store := &Secret{Client: c.Client.CoreV1(), Namespace: "meshid-system", Name: "meshid-ca"}
	ctx := context.Background()
	m, _, err := store.LoadOrCreate(ctx, func() (*Material, error) {
		return Generate(Options{TrustDomain: "cluster.local", IntermediateTTL: 3 * time.Hour})
	})
	if err != nil {
		t.Fatal(err)
	}
	a, err := store.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := store.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	due := m.RenewAt().Add(time.Second)
	srcA, srcB := &Source{}, &Source{}
	ra := &Renewer{Store: store, Source: srcA, Algorithm: ECDSAP256, TTL: 3 * time.Hour, Now: func() time.Time { return due }}
	rb := &Renewer{Store: store, Source: srcB, Algorithm: ECDSAP256, TTL: 3 * time.Hour, Now: func() time.Time { return due }}
	gotA, err := ra.Check(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	gotB, err := rb.Check(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	if !gotA.CACert.Equal(gotB.CACert) || gotA.CACert.Equal(m.CACert) {
		t.Fatal("the replicas do not share one renewed intermediate")
	}
	if srcA.Issuer().Certificate() == nil || !srcB.Issuer().Certificate().Equal(gotA.CACert) {
		t.Error("the second replica does not sign with the renewed intermediate")
	}
	// A replica that missed all this cannot write its stale copy back.
	stale := *m
	if err := stale.RenewIntermediate(ECDSAP256, time.Hour, due); err != nil {
		t.Fatal(err)
	}
	if err := store.Save(ctx, m, &stale); !errors.Is(err, ErrStale) {
		t.Fatalf("saving over a CA read before a renewal: %v, want ErrStale", err)
	}
	stored, err := store.Load(ctx)
	if err != nil || !stored.CACert.Equal(gotA.CACert) {
		t.Fatalf("the Secret holds another intermediate (%v)", err)
	}
}

// memStore is a Store in memory, as a Secret is to replicas: Save refuses a
// stale prev.
type memStore struct {
	mu sync.Mutex
	m  *Material
}

func (s *memStore) Load(context.Context) (*Material, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m, nil
}

func (s *memStore) Save(_ context.Context, prev, m *Material) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !prev.Equal(s.m) {
		return ErrStale
	}
	s.m = m
	return nil
}

// Two replicas following one store, with an intermediate due as soon as it
// is made (a lifetime shorter than three times its backdating): they renew
// once a minute between them, not in turns each time one sees the other's
// (which e2e/faults found: a renewal a second).
func TestRenewerReplicasKeepTheGap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m, err := Generate(Options{TrustDomain: "cluster.local", IntermediateTTL: 90 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if !m.RenewAt().Before(time.Now()) {
			t.Fatal("the intermediate is not due at once")
		}
		store := &memStore{m: m}
		var mu sync.Mutex
		renewals := 0
		ctx, cancel := context.WithCancel(t.Context())
		var wg sync.WaitGroup
		for range 2 {
			r := &Renewer{Store: store, Source: &Source{}, Algorithm: ECDSAP256, TTL: 90 * time.Second, Follow: time.Second,
				Renewed: func(err error) {
					mu.Lock()
					defer mu.Unlock()
					if err == nil {
						renewals++
					}
				}}
			wg.Add(1)
			go func() { defer wg.Done(); r.Run(ctx, m) }()
		}
		time.Sleep(5*time.Minute + 30*time.Second)
		cancel()
		wg.Wait()
		if renewals < 5 || renewals > 7 {
			t.Errorf("%d renewals in 5.5 minutes, want one a minute", renewals)
		}
	})
}
