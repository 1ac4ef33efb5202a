package nodeauth_test

import (
	"context"
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/nodeauth"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/poll"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// TestAuthorize runs the node proxy rules against a real kube-apiserver:
// Node and Pod objects (no kubelet: pods with spec.nodeName stay Pending),
// and callers from real pod-bound tokens through a TokenReview.
func TestAuthorize(t *testing.T) {
	c := kubetest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for _, n := range []string{"node-a", "node-b"} {
		c.Node(t, n)
	}
	ztunnelA := c.Pod(t, "istio-system", "ztunnel-a", "ztunnel", "node-a")
	c.Pod(t, "istio-system", "ztunnel-b", "ztunnel", "node-b")
	c.Pod(t, "shop", "web-1", "web", "node-a")
	c.Pod(t, "shop", "api-1", "api", "node-b")
	batch := c.Pod(t, "shop", "batch-1", "batch", "node-a")
	batch.Status.Phase = corev1.PodFailed
	if _, err := c.Client.CoreV1().Pods("shop").UpdateStatus(ctx, batch, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	unscheduled := c.Pod(t, "istio-system", "ztunnel-pending", "ztunnel", "")
	webOnB := c.Pod(t, "shop", "web-on-b", "web", "node-b")

	review := &k8sauth.TokenReview{Client: c.Client.AuthenticationV1(), Audiences: []string{"istio-ca"}}
	caller := func(pod *corev1.Pod) k8sauth.Caller {
		t.Helper()
		cl, err := review.Authenticate(ctx, c.PodToken(t, pod, "istio-ca"))
		if err != nil {
			t.Fatal(err)
		}
		return cl
	}
	zA := caller(ztunnelA)
	if zA.PodName != "ztunnel-a" || zA.PodUID != string(ztunnelA.UID) {
		t.Fatalf("caller from a pod-bound token: %+v", zA)
	}

	proxies, err := nodeauth.ParseAccounts([]string{"istio-system/ztunnel"})
	if err != nil {
		t.Fatal(err)
	}
	pods := nodeauth.Watch(ctx, c.Client, nil)
	a, err := nodeauth.New("Kubernetes", td, proxies, pods)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "pods listed", pods.Synced)
	// The last pod created is seen, so every earlier one is too.
	poll.Until(t, "the last pod seen", func() bool { return pods.Pod("shop", "web-on-b") != nil })

	web := "spiffe://cluster.local/ns/shop/sa/web"
	got, err := a.Authorize(zA, web)
	if err != nil {
		t.Fatalf("ztunnel on node-a asking for shop/web, which runs there: %v", err)
	}
	if got.ID.String() != web || got.Namespace != "shop" || got.ServiceAccount != "web" {
		t.Errorf("workload %+v", got)
	}

	refused := func(name string, cl k8sauth.Caller, requested, reason string) {
		t.Helper()
		_, err := a.Authorize(cl, requested)
		var e *nodeauth.Error
		if !errors.As(err, &e) || !errors.Is(err, nodeauth.ErrRefused) {
			t.Errorf("%s: %v, want a refusal (%s)", name, err, reason)
			return
		}
		if e.Reason != reason {
			t.Errorf("%s: reason %s (%v), want %s", name, e.Reason, err, reason)
		}
	}
	refused("workload only on another node", zA, "spiffe://cluster.local/ns/shop/sa/api", "no_workload_on_node")
	refused("workload's only pod on the node Failed", zA, "spiffe://cluster.local/ns/shop/sa/batch", "no_workload_on_node")
	refused("no such workload", zA, "spiffe://cluster.local/ns/shop/sa/nobody", "no_workload_on_node")
	refused("other trust domain", zA, "spiffe://evil.example/ns/shop/sa/web", "other_trust_domain")
	refused("not a SPIFFE ID", zA, "shop/web", "bad_identity")
	refused("not /ns/x/sa/y", zA, "spiffe://cluster.local/ns/shop/web", "bad_identity")
	refused("caller not a node proxy", caller(webOnB), "spiffe://cluster.local/ns/shop/sa/api", "not_node_proxy")
	refused("caller's pod on no node", caller(unscheduled), web, "caller_pod_not_scheduled")

	// A node proxy's token bound to no pod.
	plain, err := review.Authenticate(ctx, c.Token(t, "istio-system", "ztunnel", "istio-ca"))
	if err != nil {
		t.Fatal(err)
	}
	refused("token bound to no pod", plain, web, "token_not_pod_bound")
	remote := zA
	remote.Cluster = "cluster-2"
	refused("node proxy of another cluster", remote, web, "remote_cluster")

	// The workload's pod on the node is deleted: refused once the watch
	// has seen it go.
	c.DeletePod(t, "shop", "web-1")
	poll.Until(t, "web-1 gone from the watch", func() bool { return pods.Pod("shop", "web-1") == nil })
	refused("workload's pod deleted", zA, web, "no_workload_on_node")
	c.Pod(t, "shop", "web-2", "web", "node-a")
	poll.Until(t, "web-2 seen", func() bool { return pods.Pod("shop", "web-2") != nil })
	if _, err := a.Authorize(zA, web); err != nil {
		t.Errorf("a new pod of shop/web on node-a: %v", err)
	}

	// The node proxy's pod is deleted, then recreated under its name with
	// a new UID: the old pod's caller is refused, the new one's allowed.
	c.DeletePod(t, "istio-system", "ztunnel-a")
	poll.Until(t, "ztunnel-a gone", func() bool { return pods.Pod("istio-system", "ztunnel-a") == nil })
	refused("node proxy's pod deleted", zA, web, "caller_pod_not_found")
	recreated := c.Pod(t, "istio-system", "ztunnel-a", "ztunnel", "node-a")
	poll.Until(t, "ztunnel-a recreated", func() bool {
		p := pods.Pod("istio-system", "ztunnel-a")
		return p != nil && p.UID == recreated.UID
	})
	refused("node proxy's pod recreated with a new UID", zA, web, "caller_pod_uid_mismatch")
	if _, err := a.Authorize(caller(recreated), web); err != nil {
		t.Errorf("the recreated node proxy pod's own token: %v", err)
	}
}

// stubPods is a Pods that never listed.
type stubPods struct{}

func (stubPods) Pod(string, string) *corev1.Pod       { return nil }
func (stubPods) OnNode(string, nodeauth.Account) bool { return false }
func (stubPods) Synced() bool                         { return false }

// TestAuthorizeBeforeTheList: nothing is decided before pods are listed;
// the caller is told to retry (ErrUnavailable), not refused.
func TestAuthorizeBeforeTheList(t *testing.T) {
	a, err := nodeauth.New("Kubernetes", td, []nodeauth.Account{{Namespace: "istio-system", Name: "ztunnel"}}, stubPods{})
	if err != nil {
		t.Fatal(err)
	}
	caller := k8sauth.Caller{Namespace: "istio-system", ServiceAccount: "ztunnel", PodName: "z", PodUID: "u"}
	if _, err := a.Authorize(caller, "spiffe://cluster.local/ns/shop/sa/web"); !errors.Is(err, nodeauth.ErrUnavailable) {
		t.Errorf("before the list: %v, want ErrUnavailable", err)
	}
	// What the claims alone decide is still refused at once.
	caller.ServiceAccount = "web"
	if _, err := a.Authorize(caller, "spiffe://cluster.local/ns/shop/sa/web"); !errors.Is(err, nodeauth.ErrRefused) {
		t.Errorf("not a node proxy, before the list: %v, want a refusal", err)
	}
}

func TestParseAccounts(t *testing.T) {
	got, err := nodeauth.ParseAccounts([]string{"istio-system/ztunnel", "kube-system/my-proxy"})
	if err != nil || len(got) != 2 || got[1].String() != "kube-system/my-proxy" {
		t.Errorf("ParseAccounts = %v, %v", got, err)
	}
	for _, bad := range []string{"ztunnel", "/ztunnel", "istio-system/", "Istio/ztunnel", "a/b/c", "ns/UPPER"} {
		if _, err := nodeauth.ParseAccounts([]string{bad}); err == nil {
			t.Errorf("ParseAccounts(%q) accepted", bad)
		}
	}
}

// TestClusters: a node proxy's request goes to the authorizer of the
// cluster that verified its token; a cluster without one is refused.
func TestClusters(t *testing.T) {
	proxies := []nodeauth.Account{{Namespace: "istio-system", Name: "ztunnel"}}
	local, err := nodeauth.New("cluster-a", td, proxies, stubPods{})
	if err != nil {
		t.Fatal(err)
	}
	c := nodeauth.NewClusters("cluster-a")
	c.Set("cluster-a", local)
	caller := k8sauth.Caller{Namespace: "istio-system", ServiceAccount: "ztunnel", PodName: "z", PodUID: "u"}
	// The local authorizer answers (its pods are not listed: Unavailable).
	for _, cluster := range []string{"", "cluster-a"} {
		caller.Cluster = cluster
		if _, err := c.Authorize(caller, "spiffe://cluster.local/ns/shop/sa/web"); !errors.Is(err, nodeauth.ErrUnavailable) {
			t.Errorf("cluster %q: %v, want the local authorizer's answer", cluster, err)
		}
	}
	caller.Cluster = "cluster-b"
	var e *nodeauth.Error
	if _, err := c.Authorize(caller, "spiffe://cluster.local/ns/shop/sa/web"); !errors.As(err, &e) || e.Reason != "remote_cluster" {
		t.Errorf("a cluster with no authorizer: %v", err)
	}
	c.Remove("cluster-a", local)
	caller.Cluster = ""
	if _, err := c.Authorize(caller, "spiffe://cluster.local/ns/shop/sa/web"); !errors.As(err, &e) || e.Reason != "remote_cluster" {
		t.Errorf("after Remove: %v", err)
	}
}
