package distribute_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/distribute"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
)

// roots is a settable set of roots.
type roots struct {
	mu    sync.Mutex
	certs []*x509.Certificate
}

func (r *roots) get() []*x509.Certificate {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.certs
}

func (r *roots) set(c ...*x509.Certificate) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.certs = c
}

func newRoot(t *testing.T) *x509.Certificate {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	return m.RootCert
}

func pemOf(cs ...*x509.Certificate) string {
	var s string
	for _, c := range cs {
		s += string(ca.EncodePEM(c))
	}
	return s
}

// eventually polls cond until it holds or 20s pass.
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %v after 20s", what, err)
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
}

func bundleIn(c *kubetest.Cluster, ns, want string) func() error {
	return func() error {
		cm, err := c.Client.CoreV1().ConfigMaps(ns).Get(context.Background(), distribute.DefaultName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if cm.Data[distribute.DefaultKey] != want || len(cm.Data) != 1 {
			return fmt.Errorf("%s/%s holds %d keys, not the bundle", ns, cm.Name, len(cm.Data))
		}
		return nil
	}
}

func createNS(t *testing.T, c *kubetest.Cluster, name string) {
	t.Helper()
	if _, err := c.Client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestConfigMaps: against a real kube-apiserver, the bundle reaches every
// namespace, new ones too; an edited or deleted ConfigMap is repaired; a
// change of roots (a second root joining, as in a root rotation) reaches
// every namespace.
func TestConfigMaps(t *testing.T) {
	c := kubetest.Start(t)
	createNS(t, c, "shop")
	first := newRoot(t)
	rs := &roots{}
	rs.set(first)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- (&distribute.ConfigMaps{Client: c.Client, Roots: rs.get, Poll: 100 * time.Millisecond}).Run(ctx)
	}()

	for _, ns := range []string{"default", "kube-system", "shop"} {
		eventually(t, "bundle in "+ns, bundleIn(c, ns, pemOf(first)))
	}
	createNS(t, c, "billing")
	eventually(t, "bundle in a new namespace", bundleIn(c, "billing", pemOf(first)))

	api := c.Client.CoreV1().ConfigMaps("shop")
	cm, err := api.Get(ctx, distribute.DefaultName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data = map[string]string{distribute.DefaultKey: "tampered", "extra": "x"}
	if _, err := api.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "edited bundle repaired", bundleIn(c, "shop", pemOf(first)))
	if err := api.Delete(ctx, distribute.DefaultName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deleted bundle recreated", bundleIn(c, "shop", pemOf(first)))

	second := newRoot(t)
	cms := &distribute.ConfigMaps{Client: c.Client}
	lagging, err := cms.Lagging(ctx, []*x509.Certificate{first, second})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(lagging, "shop") || !slices.Contains(lagging, "billing") {
		t.Errorf("Lagging before the second root is written = %v, want every namespace", lagging)
	}
	rs.set(first, second)
	for _, ns := range []string{"default", "shop", "billing"} {
		eventually(t, "both roots in "+ns, bundleIn(c, ns, pemOf(first, second)))
	}
	eventually(t, "no namespace lagging", func() error {
		lagging, err := cms.Lagging(ctx, []*x509.Certificate{first, second})
		if err == nil && len(lagging) > 0 {
			err = fmt.Errorf("lagging: %v", lagging)
		}
		return err
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestLeaderFailover: two replicas, one leads; when it stops, the other
// takes over the distribution (a ConfigMap deleted afterwards comes back).
func TestLeaderFailover(t *testing.T) {
	c := kubetest.Start(t)
	createNS(t, c, "shop")
	root := newRoot(t)
	rs := &roots{}
	rs.set(root)
	if _, err := c.Client.CoreV1().Namespaces().Get(context.Background(), "default", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	var leading [2]atomic.Bool
	cancels := make([]context.CancelFunc, 2)
	stopped := make([]chan struct{}, 2)
	for i := range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		cancels[i], stopped[i] = cancel, make(chan struct{})
		l := &distribute.Leader{Client: c.Client, Namespace: "default", Lease: "meshid-ca-leader", Identity: fmt.Sprintf("replica-%d", i),
			OnChange: func(b bool) { leading[i].Store(b) }}
		go func() {
			defer close(stopped[i])
			l.Run(ctx, func(ctx context.Context) {
				(&distribute.ConfigMaps{Client: c.Client, Roots: rs.get, Poll: 100 * time.Millisecond}).Run(ctx)
			})
		}()
	}
	defer func() {
		for i := range 2 {
			cancels[i]()
			<-stopped[i]
		}
	}()
	var leader int
	eventually(t, "one leader", func() error {
		switch {
		case leading[0].Load() && leading[1].Load():
			return fmt.Errorf("two leaders")
		case leading[0].Load():
			leader = 0
		case leading[1].Load():
			leader = 1
		default:
			return fmt.Errorf("no leader")
		}
		return nil
	})
	eventually(t, "bundle in shop", bundleIn(c, "shop", pemOf(root)))

	cancels[leader]() // the leader stops (and gives the Lease up)
	<-stopped[leader]
	other := 1 - leader
	eventually(t, "the other replica leads", func() error {
		if !leading[other].Load() {
			return fmt.Errorf("replica %d does not lead", other)
		}
		return nil
	})
	if err := c.Client.CoreV1().ConfigMaps("shop").Delete(context.Background(), distribute.DefaultName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new leader repairs", bundleIn(c, "shop", pemOf(root)))
}

// TestConfigMapsFederated: the federated bundles go beside the roots while
// there are any, follow every change, and the key goes when they do.
func TestConfigMapsFederated(t *testing.T) {
	if distribute.FederatedKey != agent.FederatedBundlesKey || distribute.JWTKey != agent.JWTBundleKey {
		t.Fatalf("meshid-ca writes %q and %q, meshid-agent reads %q and %q", distribute.FederatedKey, distribute.JWTKey, agent.FederatedBundlesKey, agent.JWTBundleKey)
	}
	c := kubetest.Start(t)
	createNS(t, c, "shop")
	root := newRoot(t)
	rs := &roots{}
	rs.set(root)
	var mu sync.Mutex
	fed := []byte(`{"a.example":{"keys":[]}}`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- (&distribute.ConfigMaps{Client: c.Client, Roots: rs.get, Poll: 100 * time.Millisecond, Federated: func() []byte {
			mu.Lock()
			defer mu.Unlock()
			return fed
		}, JWT: func() []byte { return []byte(`{"keys":[]}`) }}).Run(ctx)
	}()
	holds := func(want string) func() error {
		return func() error {
			cm, err := c.Client.CoreV1().ConfigMaps("shop").Get(ctx, distribute.DefaultName, metav1.GetOptions{})
			if err != nil {
				return err
			}
			got, ok := cm.Data[distribute.FederatedKey]
			if cm.Data[distribute.DefaultKey] != pemOf(root) || got != want || ok != (want != "") || cm.Data[distribute.JWTKey] != `{"keys":[]}` {
				return fmt.Errorf("shop's ConfigMap holds %v", cm.Data)
			}
			return nil
		}
	}
	eventually(t, "federated bundles beside the roots", holds(`{"a.example":{"keys":[]}}`))
	mu.Lock()
	fed = []byte(`{"b.example":{"keys":[]}}`)
	mu.Unlock()
	eventually(t, "federated bundles changed", holds(`{"b.example":{"keys":[]}}`))
	mu.Lock()
	fed = nil
	mu.Unlock()
	eventually(t, "federated key removed", holds(""))
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
