package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/pgtest"
)

// applier applies objects to a cluster the way `kubectl apply
// --server-side` does.
type applier struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newApplier(t *testing.T, c *kubetest.Cluster) *applier {
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Client.Discovery()))}
}

func (a *applier) apply(t *testing.T, obj *unstructured.Unstructured) {
	t.Helper()
	gvk := obj.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		t.Fatalf("%s %s: %v", gvk.Kind, obj.GetName(), err)
	}
	data, err := obj.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if m.Scope.Name() == "namespace" {
		ri = a.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	force := true
	if _, err := ri.Patch(ctx, obj.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{FieldManager: "meshid-e2e", Force: &force}); err != nil {
		t.Fatalf("server-side apply of %s %s/%s refused: %v", gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
	}
}

// kustomize builds a kustomization directory as `kubectl kustomize` does.
func kustomize(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var objs []*unstructured.Unstructured
	for _, r := range resMap.Resources() {
		m, err := r.Map()
		if err != nil {
			t.Fatal(err)
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
	return objs
}

// yamlObjects reads a multi-document YAML file.
func yamlObjects(t *testing.T, path string) []*unstructured.Unstructured {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var objs []*unstructured.Unstructured
	for _, doc := range strings.Split(string(data), "\n---\n") {
		var m map[string]any
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if m != nil {
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
	return objs
}

// TestDeployManifests applies deploy/ to a real kube-apiserver with
// server-side apply, checks that its RBAC grants meshid-ca and meshid-agent
// what they need and nothing more, and runs meshid-ca with the
// Deployment's own arguments as its service account: it must create its CA
// Secret and become ready with exactly that RBAC. What a kube-apiserver
// alone cannot check (scheduling, images, probes answering) is in
// deploy/README.md.
func TestDeployManifests(t *testing.T) {
	dsn := pgtest.Database(t)
	cluster := kubetest.Start(t)
	a := newApplier(t, cluster)
	objs := kustomize(t, filepath.Join("..", "deploy", "base"))
	kinds := map[string]int{}
	for _, o := range objs {
		a.apply(t, o)
		kinds[o.GetKind()]++
	}
	for kind, n := range map[string]int{"Namespace": 2, "Deployment": 1, "DaemonSet": 1, "Service": 1, "PodDisruptionBudget": 1, "ServiceAccount": 3, "ValidatingAdmissionPolicy": 1} {
		if kinds[kind] != n {
			t.Errorf("deploy/base has %d %s, want %d", kinds[kind], kind, n)
		}
	}
	// Applying again changes nothing and is accepted (idempotent).
	for _, o := range objs {
		a.apply(t, o)
	}
	cluster.ServiceAccount(t, "shop", "default")
	for _, o := range yamlObjects(t, filepath.Join("..", "deploy", "examples", "pod-mode.yaml")) {
		a.apply(t, o)
	}

	ctx := context.Background()
	dep, err := cluster.Client.AppsV1().Deployments("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	checkHardened(t, dep)

	// RBAC: what each service account needs, and a sample of what it must
	// not have.
	for _, tc := range []struct {
		sa      string
		attr    authorizationv1.ResourceAttributes
		allowed bool
	}{
		{"meshid-ca", authorizationv1.ResourceAttributes{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Name: "meshid-ca", Verb: "get"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Name: "meshid-ca", Verb: "update"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Verb: "create"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Group: "coordination.k8s.io", Resource: "leases", Name: "meshid-ca-leader", Verb: "update"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "configmaps", Verb: "create"}, true}, // by name: the admission policy
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "configmaps", Name: "istio-ca-root-cert", Verb: "update"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Resource: "configmaps", Name: "istio-ca-root-cert", Verb: "list"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Resource: "configmaps", Name: "istio-ca-root-cert", Verb: "watch"}, true},
		// Every other ConfigMap in the cluster is out of reach.
		{"meshid-ca", authorizationv1.ResourceAttributes{Resource: "configmaps", Verb: "list"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "kube-system", Resource: "configmaps", Name: "coredns", Verb: "get"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "kube-system", Resource: "configmaps", Name: "coredns", Verb: "update"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "kube-system", Resource: "configmaps", Name: "coredns", Verb: "patch"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "configmaps", Name: "istio-ca-root-cert", Verb: "patch"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Resource: "namespaces", Verb: "watch"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Verb: "list"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Name: "meshid-ledger", Verb: "get"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "secrets", Verb: "get"}, false},
		// Offline token checks watch pods and service accounts; nothing
		// more of them: not get, not exec, not minting tokens.
		{"meshid-ca", authorizationv1.ResourceAttributes{Resource: "pods", Verb: "watch"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Resource: "serviceaccounts", Verb: "list"}, true},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "pods", Verb: "get"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "pods", Subresource: "exec", Verb: "create"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "serviceaccounts", Subresource: "token", Verb: "create"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "pods", Verb: "delete"}, false},
		{"meshid-ca", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "configmaps", Verb: "delete"}, false},
		{"meshid-agent", authorizationv1.ResourceAttributes{Group: "authentication.k8s.io", Resource: "tokenreviews", Verb: "create"}, true},
		{"meshid-agent", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Name: "meshid-ca", Verb: "get"}, false},
		{"meshid-agent", authorizationv1.ResourceAttributes{Namespace: "shop", Resource: "configmaps", Verb: "update"}, false},
		{"meshid-admin", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Verb: "get"}, false},
	} {
		ns := map[string]string{"meshid-agent": "meshid-node"}[tc.sa]
		if ns == "" {
			ns = "meshid-system"
		}
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User: "system:serviceaccount:" + ns + ":" + tc.sa, ResourceAttributes: &tc.attr,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
		}}
		got, err := cluster.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got.Status.Allowed != tc.allowed {
			t.Errorf("%s may %s %s %s/%s: %v, want %v", tc.sa, tc.attr.Verb, tc.attr.Resource, tc.attr.Namespace, tc.attr.Name, got.Status.Allowed, tc.allowed)
		}
	}

	// Pod Security: the CA's pods pass the restricted level of its
	// namespace; the agent's need the privileged level of its own (its
	// hostPath), which is why it is not in the CA's.
	ds, err := cluster.Client.AppsV1().DaemonSets("meshid-node").Get(ctx, "meshid-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dryRunPod := func(ns string, spec corev1.PodTemplateSpec) error {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: "psa-", Namespace: ns, Labels: spec.Labels}, Spec: spec.Spec}
		_, err := cluster.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	}
	if err := dryRunPod("meshid-system", dep.Spec.Template); err != nil {
		t.Errorf("meshid-ca's pod in meshid-system: %v", err)
	}
	if err := dryRunPod("meshid-node", ds.Spec.Template); err != nil {
		t.Errorf("meshid-agent's pod in meshid-node: %v", err)
	}
	if err := dryRunPod("meshid-system", ds.Spec.Template); err == nil {
		t.Error("meshid-agent's pod is admitted in meshid-system: the CA's namespace is not restricted")
	}

	// The admission policy: as meshid-ca, a ConfigMap of another name is
	// refused everywhere (RBAC cannot limit create by name).
	caClient, err := kubernetes.NewForConfig(restConfigFor(t, cluster.KubeconfigFor(t, "meshid-system", "meshid-ca")))
	if err != nil {
		t.Fatal(err)
	}
	planted := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "planted", Namespace: "kube-system"}, Data: map[string]string{"x": "y"}}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := caClient.CoreV1().ConfigMaps("kube-system").Create(ctx, planted, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil && strings.Contains(err.Error(), "meshid-ca may write only the istio-ca-root-cert ConfigMap") {
			break
		}
		// The policy takes effect a moment after it is created.
		if time.Now().After(deadline) {
			t.Fatalf("meshid-ca may create a ConfigMap named planted in kube-system: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // poll interval
	}

	// meshid-ca with the Deployment's arguments, as its service account.
	args := slices.Clone(dep.Spec.Template.Spec.Containers[0].Args)
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn), 0o600); err != nil {
		t.Fatal(err)
	}
	for i, arg := range args {
		if strings.HasPrefix(arg, "--ledger-dsn-file=") {
			args[i] = "--ledger-dsn-file=" + dsnFile // the Secret mount, here a file
		}
	}
	args = append(args, "--kubeconfig="+cluster.KubeconfigFor(t, "meshid-system", "meshid-ca"), "--namespace=meshid-system", "--state-dir="+filepath.Join(dir, "state"))
	p := startCA(t, args...)
	p.WaitReady(t, 60*time.Second)
	sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("meshid-ca ready but its Secret is not there: %v", err)
	}
	if len(sec.Data["ca-key.pem"]) == 0 || len(sec.Data["root-cert.pem"]) == 0 {
		t.Errorf("meshid-ca Secret holds %d keys, without the CA", len(sec.Data))
	}
	if p.AdminAddr == "" {
		t.Error("the Deployment's arguments serve no admin API")
	}
	// With that RBAC it is elected and writes the trust bundle into every
	// namespace, the workloads' too.
	for _, ns := range []string{"meshid-system", "shop", "default"} {
		deadline := time.Now().Add(30 * time.Second)
		for {
			cm, err := cluster.Client.CoreV1().ConfigMaps(ns).Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
			if err == nil && cm.Data["root-cert.pem"] == string(sec.Data["root-cert.pem"]) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no istio-ca-root-cert with the CA's root in %s after 30s (%v)", ns, err)
			}
			time.Sleep(100 * time.Millisecond) // poll interval
		}
	}
	if lease, err := cluster.Client.CoordinationV1().Leases("meshid-system").Get(ctx, "meshid-ca-leader", metav1.GetOptions{}); err != nil || lease.Spec.HolderIdentity == nil {
		t.Errorf("meshid-ca-leader Lease: %v, %v", lease, err)
	}

	// Istio drop-in (deploy/istio.md): Istio's own agent, with a projected
	// token from the API server and the root from the istio-ca-root-cert
	// ConfigMap meshid-ca wrote, as a sidecar mounts them, gets its
	// certificate; the token is checked by TokenReview with the CA's own
	// RBAC.
	agentDir := pilotAgentDir(t)
	cluster.ServiceAccount(t, "shop", "web")
	cm, err := cluster.Client.CoreV1().ConfigMaps("shop").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rootPath := filepath.Join(dir, "istio-ca-root-cert", "root-cert.pem")
	mustWrite(t, rootPath, []byte(cm.Data["root-cert.pem"]), 0o644)
	_, grpcPort, _ := strings.Cut(p.GRPCAddr, ":")
	_, chainPEM, rootPEM := istioAgentCerts(t, agentDir, grpcPort, rootPath, cluster.Token(t, "shop", "web", "istio-ca"), "shop", "web", "web-7d4b9-abcde", nil)
	chain, err := ca.ParseCertificatesPEM(chainPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := ca.ParseCertificatesPEM([]byte(cm.Data["root-cert.pem"]))
	if err != nil {
		t.Fatal(err)
	}
	if last := chain[len(chain)-1]; last.Equal(roots[0]) {
		chain = chain[:len(chain)-1]
	}
	verifySVID(t, "pilot-agent's certificate from the deployed configuration", append(chain, roots[0]),
		spiffeid.RequireTrustDomainFromString("cluster.local"), roots, spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web"))
	if agentRoots, err := ca.ParseCertificatesPEM(rootPEM); err != nil || len(agentRoots) != 1 || !agentRoots[0].Equal(roots[0]) {
		t.Errorf("pilot-agent's root-cert.pem is not the distributed bundle's root (%v)", err)
	}
}

// checkHardened checks what a platform engineer expects of a CA's pods.
func restConfigFor(t *testing.T, kubeconfig string) *rest.Config {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func checkHardened(t *testing.T, dep *appsv1.Deployment) {
	t.Helper()
	spec := dep.Spec.Template.Spec
	c := spec.Containers[0]
	switch {
	case *dep.Spec.Replicas != 2:
		t.Errorf("meshid-ca replicas %d, want 2", *dep.Spec.Replicas)
	case spec.SecurityContext.RunAsNonRoot == nil || !*spec.SecurityContext.RunAsNonRoot:
		t.Error("meshid-ca may run as root")
	case c.SecurityContext.ReadOnlyRootFilesystem == nil || !*c.SecurityContext.ReadOnlyRootFilesystem:
		t.Error("meshid-ca's root filesystem is writable")
	case c.SecurityContext.AllowPrivilegeEscalation == nil || *c.SecurityContext.AllowPrivilegeEscalation:
		t.Error("meshid-ca may escalate privileges")
	case c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" || c.LivenessProbe == nil || c.LivenessProbe.HTTPGet.Path != "/healthz":
		t.Error("meshid-ca's probes are not /readyz and /healthz")
	case c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero():
		t.Error("meshid-ca has no resource requests")
	case dep.Spec.Template.Annotations["prometheus.io/scrape"] != "true":
		t.Error("meshid-ca is not annotated for Prometheus")
	}
}
