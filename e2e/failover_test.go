package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/pgtest"
)

// TestLeaderFailover: two meshid-ca replicas (CA in a Secret, one
// PostgreSQL ledger) on a real kube-apiserver. Both issue; one leads the
// trust-bundle ConfigMaps. The leader is stopped while a client keeps
// asking the other for certificates: not one request fails, the other
// replica takes the Lease over, and it repairs a deleted ConfigMap.
func TestLeaderFailover(t *testing.T) {
	dsn := pgtest.Database(t)
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "meshid-system", "meshid-ca")
	cluster.ServiceAccount(t, "shop", "web")
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn), 0o600); err != nil {
		t.Fatal(err)
	}
	replicas := map[string]*caProcess{}
	for _, name := range []string{"ca-a", "ca-b"} {
		replicas[name] = launchCA(t, "--auth=tokenreview", "--kubeconfig="+cluster.Kubeconfig,
			"--ca-source=secret", "--namespace=meshid-system", "--secret-name=meshid-ca",
			"--ledger=postgres", "--ledger-dsn-file="+dsnFile, "--pod-name="+name, "--rate-limit=0")
	}
	for _, p := range replicas {
		p.WaitServing(t)
		p.WaitReady(t, 60*time.Second)
	}
	ctx := context.Background()
	leases := cluster.Client.CoordinationV1().Leases("meshid-system")
	holder := func() string {
		l, err := leases.Get(ctx, "meshid-ca-leader", metav1.GetOptions{})
		if err != nil || l.Spec.HolderIdentity == nil {
			return ""
		}
		return *l.Spec.HolderIdentity
	}
	waitUntil(t, 60*time.Second, "a leader", func() bool { return holder() != "" })
	leader := holder()
	follower := map[string]string{"ca-a": "ca-b", "ca-b": "ca-a"}[leader]
	if follower == "" {
		t.Fatalf("unknown lease holder %q", leader)
	}
	sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	roots, err := ca.ParseCertificatesPEM(sec.Data["root-cert.pem"])
	if err != nil {
		t.Fatal(err)
	}
	cms := cluster.Client.CoreV1().ConfigMaps("shop")
	bundled := func() bool {
		cm, err := cms.Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		return err == nil && cm.Data["root-cert.pem"] == string(sec.Data["root-cert.pem"])
	}
	waitUntil(t, 60*time.Second, "the bundle in shop", bundled)

	// A client of the follower issues continuously while the leader goes.
	client := replicas[follower].Client(t, roots)
	token := cluster.Token(t, "shop", "web", "istio-ca")
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	var issued, failed atomic.Int64
	var firstErr sync.Once
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := sign(ctx, client, id, token); err != nil {
				failed.Add(1)
				firstErr.Do(func() { t.Errorf("the follower failed a request during the failover: %v", err) })
			} else {
				issued.Add(1)
			}
		}
	})
	waitUntil(t, 60*time.Second, "issuance before the failover", func() bool { return issued.Load() >= 10 })
	before := issued.Load()
	replicas[leader].cmd.Process.Signal(syscall.SIGTERM)
	replicas[leader].Stop(t)
	waitUntil(t, 60*time.Second, "the follower leading", func() bool { return holder() == follower })
	if err := cms.Delete(ctx, "istio-ca-root-cert", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 60*time.Second, "the new leader repairing the bundle", bundled)
	waitUntil(t, 60*time.Second, "issuance after the failover", func() bool { return issued.Load() >= before+10 })
	close(stop)
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d of %d requests failed during the failover", failed.Load(), failed.Load()+issued.Load())
	}
	if m := replicas[follower].Metrics(t); !strings.Contains(m, "meshid_ca_leader 1") {
		t.Errorf("the new leader's metrics do not say it leads")
	}
	t.Logf("%d certificates issued by %s while %s stopped and %s took the Lease over", issued.Load(), follower, leader, follower)
}
