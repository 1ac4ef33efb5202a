package e2e

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/poll"
)

// TestMulticluster runs meshid-ca in cluster A with cluster B's kubeconfig
// given as a remote secret, on two real kube-apiservers: a caller is
// checked against the cluster it names and no other, the ledger records
// the cluster that verified it, the trust bundle reaches B's namespaces,
// and the Secret is picked up and dropped while meshid-ca runs.
func TestMulticluster(t *testing.T) {
	a, b := kubetest.Start(t), kubetest.Start(t)
	ctx := context.Background()
	for _, c := range []*kubetest.Cluster{a, b} {
		c.ServiceAccount(t, "shop", "web")
	}
	a.ServiceAccount(t, "ops", "admin")
	a.ServiceAccount(t, "meshid-system", "meshid-ca")

	// In B, the reader account meshid-ca uses there: TokenReview, and the
	// trust-bundle ConfigMaps (deploy/README.md lists the same).
	b.ServiceAccount(t, "meshid-system", "meshid-remote")
	rb := b.Client.RbacV1()
	if _, err := rb.ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "meshid-remote"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
			{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
			{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"get", "list", "watch", "create", "update"}, ResourceNames: nil},
			{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list", "watch"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := rb.ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "meshid-remote"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "meshid-remote"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "meshid-system", Name: "meshid-remote"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeconfigB, err := os.ReadFile(b.KubeconfigFor(t, "meshid-system", "meshid-remote"))
	if err != nil {
		t.Fatal(err)
	}

	state := t.TempDir()
	p := startCA(t, "--kubeconfig="+a.Kubeconfig, "--ca-source=dir", "--state-dir="+state, "--namespace=meshid-system",
		"--cluster-id=cluster-a", "--remote-secret-selector=istio/multiCluster=true", "--remote-bundle-configmaps",
		"--admin-service-accounts=ops/admin", "--pod-name=meshid-ca-0", "--node-proxy-service-accounts=istio-system/ztunnel")
	p.WaitReady(t, 60*time.Second)
	rootFile := filepath.Join(state, "ca", keys.RootCertFile)
	roots := readRoots(t, rootFile)
	client := func(cluster string) *agent.CAClient {
		conn, err := agent.DialCA(p.GRPCAddr, func() []*x509.Certificate { return roots }, "localhost")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return agent.NewCAClient(conn, cluster)
	}
	web := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	tokenA, tokenB := a.Token(t, "shop", "web", "istio-ca"), b.Token(t, "shop", "web", "istio-ca")
	asA, asB, asNone := client("cluster-a"), client("cluster-b"), client("")

	if _, err := sign(ctx, asA, web, tokenA); err != nil {
		t.Fatalf("A's token naming A: %v", err)
	}
	if _, err := sign(ctx, asNone, web, tokenA); err != nil {
		t.Fatalf("A's token naming no cluster: %v", err)
	}
	if _, err := sign(ctx, asB, web, tokenB); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("B's token before B's Secret: %v, want Unauthenticated", err)
	}

	// A kubeconfig that would run a command is refused; the cluster stays
	// unknown.
	secrets := a.Client.CoreV1().Secrets("meshid-system")
	evil := []byte("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n" +
		"users: [{name: u, user: {exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh, args: [-c, 'touch /tmp/pwned']}}}]\n" +
		"contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n")
	if _, err := secrets.Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "remote-evil", Labels: map[string]string{"istio/multiCluster": "true"}},
		Data:       map[string][]byte{"cluster-evil": evil},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "the exec kubeconfig refused in the log", func() bool {
		return strings.Contains(p.Log(), "runs a command (exec): refused")
	})

	if _, err := secrets.Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "remote-b", Labels: map[string]string{"istio/multiCluster": "true"}},
		Data:       map[string][]byte{"cluster-b": kubeconfigB},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	poll.Until(t, "B's token accepted once B's Secret is read", func() bool {
		chain, err = sign(ctx, asB, web, tokenB)
		return err == nil
	})
	if _, err := sign(ctx, asA, web, tokenB); status.Code(err) != codes.Unauthenticated {
		t.Errorf("B's token naming A: %v, want Unauthenticated", err)
	}
	if _, err := sign(ctx, asB, web, tokenA); status.Code(err) != codes.Unauthenticated {
		t.Errorf("A's token naming B: %v, want Unauthenticated", err)
	}
	if _, err := sign(ctx, client("cluster-c"), web, tokenA); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a cluster no Secret names: %v, want Unauthenticated", err)
	}
	if got := chain[0].URIs[0].String(); got != web.String() {
		t.Errorf("B's caller got %s: identities are the same in every cluster", got)
	}

	// B's ztunnel gets the certificate of a workload on its node in B,
	// checked against B's pods; as cluster A's, it is refused.
	b.Node(t, "b-node-1")
	ztunnelB := b.Pod(t, "istio-system", "ztunnel-b1", "ztunnel", "b-node-1")
	b.Pod(t, "shop", "web-b1", "web", "b-node-1")
	z := newZtunnelClient(t, p.GRPCAddr, roots, b.PodToken(t, ztunnelB, "istio-ca"))
	z.cluster = "cluster-b"
	poll.Until(t, "B's ztunnel served once B's pods are listed", func() bool {
		_, _, err := z.fetch(t, web.String())
		return err == nil
	})
	z.cluster = "cluster-a"
	if _, _, err := z.fetch(t, web.String()); status.Code(err) != codes.Unauthenticated {
		t.Errorf("B's ztunnel naming cluster A: %v, want Unauthenticated", err)
	}

	tokFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokFile, []byte(a.Token(t, "ops", "admin", "istio-ca")), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &ctl{t: t, p: p, caFile: rootFile, tokFile: tokFile}
	clusters := map[string]int{}
	for _, r := range c.certs() {
		clusters[r["cluster_id"].(string)]++
	}
	if clusters["cluster-a"] != 2 || clusters["cluster-b"] != 2 || len(clusters) != 2 {
		t.Errorf("ledger clusters %v, want cluster-a 2, cluster-b 2 (B's workload and B's ztunnel for it)", clusters)
	}

	// The trust bundle reaches B's namespaces.
	poll.Until(t, "the trust bundle in B's namespace shop", func() bool {
		cm, err := b.Client.CoreV1().ConfigMaps("shop").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			return false
		}
		got, err := ca.ParseCertificatesPEM([]byte(cm.Data["root-cert.pem"]))
		return err == nil && len(got) == 1 && got[0].Equal(roots[0])
	})
	if !strings.Contains(p.Metrics(t), "meshid_ca_remote_clusters 1") {
		t.Errorf("meshid_ca_remote_clusters is not 1")
	}

	// The Secret goes: so does cluster B.
	if err := secrets.Delete(ctx, "remote-b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "B's token refused once B's Secret is gone", func() bool {
		_, err := sign(ctx, asB, web, tokenB)
		return status.Code(err) == codes.Unauthenticated
	})
}
