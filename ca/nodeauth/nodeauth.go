package nodeauth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/meshid/meshid/ca/k8sauth"
)

// Account is a service account, namespace/name.
type Account struct {
	Namespace, Name string
}

func (a Account) String() string { return a.Namespace + "/" + a.Name }

// ParseAccounts parses namespace/name pairs, as --node-proxy-service-accounts
// gives them.
func ParseAccounts(list []string) ([]Account, error) {
	var out []Account
	for _, s := range list {
		ns, name, ok := strings.Cut(s, "/")
		if !ok || len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
			return nil, fmt.Errorf("nodeauth: %q is not a service account as namespace/name", s)
		}
		out = append(out, Account{Namespace: ns, Name: name})
	}
	return out, nil
}

// ErrRefused matches every refusal: the caller may not have the identity it
// asked for. Its [Error] says why.
var ErrRefused = errors.New("nodeauth: impersonation refused")

// ErrUnavailable: the pods are not listed yet, so nothing can be decided.
var ErrUnavailable = errors.New("nodeauth: pods not listed yet")

// Error is a refusal. Reason is a short fixed label for metrics and logs.
type Error struct {
	Reason string
	Detail string
}

func (e *Error) Error() string {
	return "nodeauth: impersonation refused: " + e.Reason + ": " + e.Detail
}

// Is makes errors.Is(err, ErrRefused) true.
func (e *Error) Is(target error) bool { return target == ErrRefused }

func refuse(reason, format string, args ...any) error {
	return &Error{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// Workload is the identity a node proxy asked for.
type Workload struct {
	ID             spiffeid.ID
	Namespace      string
	ServiceAccount string
}

// Pods looks pods up. *Watcher is one.
type Pods interface {
	// Pod is the pod namespace/name, trimmed; nil if there is none.
	Pod(namespace, name string) *corev1.Pod
	// OnNode says whether a pod of account that has not ended is on node.
	OnNode(node string, account Account) bool
	Synced() bool
}

// Authorizer decides node proxies' requests.
type Authorizer struct {
	cluster string
	td      spiffeid.TrustDomain
	proxies map[Account]bool
	pods    Pods
}

// New returns an Authorizer for the node proxies in proxies, none of which
// may be empty, in trust domain td, with pods of the cluster named cluster
// (callers verified by another cluster are refused: their pods are not
// watched).
func New(cluster string, td spiffeid.TrustDomain, proxies []Account, pods Pods) (*Authorizer, error) {
	if td.IsZero() || len(proxies) == 0 || pods == nil {
		return nil, errors.New("nodeauth: New needs a trust domain, node proxy accounts and pods")
	}
	a := &Authorizer{cluster: cluster, td: td, proxies: map[Account]bool{}, pods: pods}
	for _, p := range proxies {
		a.proxies[p] = true
	}
	return a, nil
}

// Authorize says whether caller may get a certificate for requested (the
// request's ImpersonatedIdentity, as sent) and, if so, whose it is.
func (a *Authorizer) Authorize(caller k8sauth.Caller, requested string) (Workload, error) {
	account := Account{Namespace: caller.Namespace, Name: caller.ServiceAccount}
	if !a.proxies[account] {
		return Workload{}, refuse("not_node_proxy", "%s is not a node proxy's service account", account)
	}
	if caller.Cluster != "" && caller.Cluster != a.cluster {
		return Workload{}, refuse("remote_cluster", "node proxies of cluster %.64q: only this cluster's (%s) pods are watched", caller.Cluster, a.cluster)
	}
	w, err := a.parse(requested)
	if err != nil {
		return Workload{}, err
	}
	if caller.PodName == "" || caller.PodUID == "" {
		return Workload{}, refuse("token_not_pod_bound", "the node proxy's token is bound to no pod")
	}
	if !a.pods.Synced() {
		return Workload{}, ErrUnavailable
	}
	pod := a.pods.Pod(caller.Namespace, caller.PodName)
	switch {
	case pod == nil:
		return Workload{}, refuse("caller_pod_not_found", "pod %s/%s not found", caller.Namespace, caller.PodName)
	case string(pod.UID) != caller.PodUID:
		return Workload{}, refuse("caller_pod_uid_mismatch", "pod %s/%s has UID %s, the token names %s", caller.Namespace, caller.PodName, pod.UID, caller.PodUID)
	case pod.Spec.ServiceAccountName != caller.ServiceAccount:
		return Workload{}, refuse("caller_pod_account_mismatch", "pod %s/%s runs as %s, not %s", caller.Namespace, caller.PodName, pod.Spec.ServiceAccountName, caller.ServiceAccount)
	case pod.Spec.NodeName == "":
		return Workload{}, refuse("caller_pod_not_scheduled", "pod %s/%s is on no node", caller.Namespace, caller.PodName)
	}
	if !a.pods.OnNode(pod.Spec.NodeName, Account{Namespace: w.Namespace, Name: w.ServiceAccount}) {
		return Workload{}, refuse("no_workload_on_node", "no running pod of %s/%s on node %s", w.Namespace, w.ServiceAccount, pod.Spec.NodeName)
	}
	return w, nil
}

// parse reads an ImpersonatedIdentity: spiffe://<td>/ns/<ns>/sa/<sa>.
func (a *Authorizer) parse(requested string) (Workload, error) {
	id, err := spiffeid.FromString(requested)
	if err != nil {
		return Workload{}, refuse("bad_identity", "ImpersonatedIdentity is not a SPIFFE ID: %v", err)
	}
	if id.TrustDomain() != a.td {
		return Workload{}, refuse("other_trust_domain", "ImpersonatedIdentity %s is not in trust domain %s", id, a.td)
	}
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" ||
		len(validation.IsDNS1123Label(seg[1])) > 0 || len(validation.IsDNS1123Subdomain(seg[3])) > 0 {
		return Workload{}, refuse("bad_identity", "ImpersonatedIdentity %s is not /ns/<namespace>/sa/<service account>", id)
	}
	return Workload{ID: id, Namespace: seg[1], ServiceAccount: seg[3]}, nil
}

// byNodeAccount indexes pods that have not ended by node/namespace/account.
const byNodeAccount = "node-account"

func nodeAccountKey(node string, a Account) string {
	return node + "/" + a.Namespace + "/" + a.Name
}

// Watcher watches every pod of the cluster, keeping of each only its name,
// namespace, UID, node, service account and phase.
type Watcher struct {
	inf cache.SharedIndexInformer
}

// Watch starts watching pods through client until ctx ends. It returns at
// once; the list arrives in the background.
func Watch(ctx context.Context, client kubernetes.Interface, log *slog.Logger) *Watcher {
	pods := client.CoreV1().Pods(metav1.NamespaceAll)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return pods.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return pods.Watch(ctx, opts)
		},
	}
	inf := cache.NewSharedIndexInformerWithOptions(lw, &corev1.Pod{}, cache.SharedIndexInformerOptions{
		ObjectDescription: "pods (node proxies)",
		Indexers:          cache.Indexers{byNodeAccount: indexNodeAccount},
	})
	inf.SetTransform(trimPod)
	go inf.RunWithContext(ctx)
	if log != nil {
		go func() {
			if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
				log.Info("node proxies: pods listed; ambient mode requests are decided")
			}
		}()
	}
	return &Watcher{inf: inf}
}

// trimPod keeps what Authorize reads and what the informer needs: about
// 1.5 KB a pod with its index entries (BenchmarkAuthorize), however large
// its spec.
func trimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion},
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName},
		Status:     corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}

func indexNodeAccount(obj any) ([]string, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok || p.Spec.NodeName == "" || p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
		return nil, nil
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return []string{nodeAccountKey(p.Spec.NodeName, Account{Namespace: p.Namespace, Name: sa})}, nil
}

// Pod implements [Pods].
func (w *Watcher) Pod(namespace, name string) *corev1.Pod {
	v, ok, err := w.inf.GetStore().GetByKey(namespace + "/" + name)
	if err != nil || !ok {
		return nil
	}
	p, _ := v.(*corev1.Pod)
	return p
}

// OnNode implements [Pods].
func (w *Watcher) OnNode(node string, account Account) bool {
	keys, err := w.inf.GetIndexer().IndexKeys(byNodeAccount, nodeAccountKey(node, account))
	return err == nil && len(keys) > 0
}

// Synced implements [Pods]: the first list arrived.
func (w *Watcher) Synced() bool { return w.inf.HasSynced() }

// Clusters holds an Authorizer per cluster, for a CA that checks callers of
// several clusters (multicluster): a node proxy's request goes to the
// authorizer of the cluster that verified its token, which watches that
// cluster's pods.
type Clusters struct {
	local string
	mu    sync.RWMutex
	by    map[string]*Authorizer
}

// NewClusters returns an empty set; local is this cluster's ID, which
// callers verified by an authenticator that names no cluster belong to.
func NewClusters(local string) *Clusters {
	return &Clusters{local: local, by: map[string]*Authorizer{}}
}

// Set makes a the authorizer of cluster id.
func (c *Clusters) Set(id string, a *Authorizer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.by[id] = a
}

// Remove forgets cluster id's authorizer if it is still a (a replaced
// cluster's new one stays).
func (c *Clusters) Remove(id string, a *Authorizer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.by[id] == a {
		delete(c.by, id)
	}
}

// Authorize is [Authorizer.Authorize] by the caller's cluster.
func (c *Clusters) Authorize(caller k8sauth.Caller, requested string) (Workload, error) {
	id := caller.Cluster
	if id == "" {
		id = c.local
	}
	c.mu.RLock()
	a := c.by[id]
	c.mu.RUnlock()
	if a == nil {
		return Workload{}, refuse("remote_cluster", "no pods watched for cluster %.64q", id)
	}
	return a.Authorize(caller, requested)
}
