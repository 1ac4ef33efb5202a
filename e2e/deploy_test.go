package e2e

import (
	"context"
	"fmt"
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
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	watchtools "k8s.io/client-go/tools/watch"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/pgtest"
	"github.com/meshid/meshid/internal/poll"
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
	a.applyTwice(t, objs)
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.GetKind()]++
	}
	for kind, n := range map[string]int{"Namespace": 2, "Deployment": 1, "DaemonSet": 1, "Service": 1, "PodDisruptionBudget": 1, "ServiceAccount": 3, "ValidatingAdmissionPolicy": 1} {
		if kinds[kind] != n {
			t.Errorf("deploy/base has %d %s, want %d", kinds[kind], kind, n)
		}
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
	if *dep.Spec.Replicas != 2 {
		t.Errorf("meshid-ca replicas %d, want 2", *dep.Spec.Replicas)
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
		checkAccess(t, cluster, ns+"/"+tc.sa, tc.attr, tc.allowed)
	}

	checkPodSecurity(t, cluster, "meshid-system", "meshid-node")
	checkConfigMapPolicy(t, cluster, "meshid-system", "istio-ca-root-cert")

	// meshid-ca with the Deployment's arguments, as its service account,
	// its ledger's Secret mounted as the kubelet would.
	createSecret(t, cluster, "meshid-system", "meshid-ledger", map[string][]byte{"dsn": []byte(dsn)})
	p, _ := runDeployedCA(t, cluster, "meshid-system")
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
	waitBundle(t, cluster, "istio-ca-root-cert", string(sec.Data["root-cert.pem"]), "meshid-system", "shop", "default")
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
	rootPath := filepath.Join(t.TempDir(), "istio-ca-root-cert", "root-cert.pem")
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

// restConfigFor reads a kubeconfig file.
func restConfigFor(t *testing.T, kubeconfig string) *rest.Config {
	t.Helper()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// checkHardened checks what a platform engineer expects of a CA's pods.
func checkHardened(t *testing.T, dep *appsv1.Deployment) {
	t.Helper()
	spec := dep.Spec.Template.Spec
	c := spec.Containers[0]
	switch {
	case spec.SecurityContext.RunAsNonRoot == nil || !*spec.SecurityContext.RunAsNonRoot:
		t.Error("meshid-ca may run as root")
	case spec.SecurityContext.FSGroup == nil:
		t.Error("meshid-ca has no fsGroup: as a non-root user it cannot read its Secret volumes' files (root's, mode 0400)")
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

// applyTwice applies objs in order, then again: the second time must be
// accepted too and change nothing (idempotent, as a re-run of kubectl apply
// or helm upgrade).
func (a *applier) applyTwice(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	for range 2 {
		for _, o := range objs {
			a.apply(t, o)
		}
	}
}

// checkAccess asks the API server (SubjectAccessReview) whether service
// account sa ("namespace/name") may do attr, and fails t unless the answer
// is allowed.
func checkAccess(t *testing.T, c *kubetest.Cluster, sa string, attr authorizationv1.ResourceAttributes, allowed bool) {
	t.Helper()
	ns, name, _ := strings.Cut(sa, "/")
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User: "system:serviceaccount:" + ns + ":" + name, ResourceAttributes: &attr,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := c.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.Allowed != allowed {
		t.Errorf("%s may %s %s %s/%s: %v, want %v", sa, attr.Verb, attr.Resource, attr.Namespace, attr.Name, got.Status.Allowed, allowed)
	}
}

// checkPodSecurity checks, by dry-run creation of their pods, that
// meshid-ca's pods pass the restricted level of caNS and that meshid-agent's
// (when agentNS is not empty) need the privileged level of its own
// namespace (its hostPath), which is why it is not in the CA's.
func checkPodSecurity(t *testing.T, c *kubetest.Cluster, caNS, agentNS string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dryRunPod := func(ns string, spec corev1.PodTemplateSpec) error {
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{GenerateName: "psa-", Namespace: ns, Labels: spec.Labels}, Spec: spec.Spec}
		_, err := c.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	}
	dep, err := c.Client.AppsV1().Deployments(caNS).Get(ctx, "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := dryRunPod(caNS, dep.Spec.Template); err != nil {
		t.Errorf("meshid-ca's pod in %s: %v", caNS, err)
	}
	if agentNS == "" {
		return
	}
	ds, err := c.Client.AppsV1().DaemonSets(agentNS).Get(ctx, "meshid-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := dryRunPod(agentNS, ds.Spec.Template); err != nil {
		t.Errorf("meshid-agent's pod in %s: %v", agentNS, err)
	}
	if err := dryRunPod(caNS, ds.Spec.Template); err == nil {
		t.Errorf("meshid-agent's pod is admitted in %s: the CA's namespace is not restricted", caNS)
	}
}

// checkConfigMapPolicy checks the admission policy: as meshid-ca of caNS,
// a ConfigMap of another name than bundle is refused everywhere (RBAC cannot
// limit create by name).
func checkConfigMapPolicy(t *testing.T, c *kubetest.Cluster, caNS, bundle string) {
	t.Helper()
	caClient, err := kubernetes.NewForConfig(restConfigFor(t, c.KubeconfigFor(t, caNS, "meshid-ca")))
	if err != nil {
		t.Fatal(err)
	}
	planted := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "planted", Namespace: "kube-system"}, Data: map[string]string{"x": "y"}}
	var last error
	// The policy takes effect a moment after it is created.
	poll.Until(t, "the admission policy to refuse meshid-ca a ConfigMap named planted in kube-system", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, last = caClient.CoreV1().ConfigMaps("kube-system").Create(ctx, planted, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return last != nil && strings.Contains(last.Error(), "meshid-ca may write only the "+bundle+" ConfigMap")
	})
}

// createSecret creates Secret ns/name holding data, as an administrator
// does before installing.
func createSecret(t *testing.T, c *kubetest.Cluster, ns, name string, data map[string][]byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Data: data}
	if _, err := c.Client.CoreV1().Secrets(ns).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Secret %s/%s: %v", ns, name, err)
	}
}

// runDeployedCA runs meshid-ca as the kubelet would run a pod of the
// Deployment meshid-ca in ns, as far as a test without a kubelet can: with
// its container's arguments, as its service account (a token of it, so with
// exactly the RBAC the manifests grant; in-cluster configuration and
// namespace given as --kubeconfig and --namespace), and with its volumes
// mounted in temporary directories named in the arguments in place of their
// mount paths: Secret and ConfigMap volumes hold the keys of the object read
// from the API server (a missing one fails the test, as it keeps the pod
// from starting), emptyDir and persistentVolumeClaim volumes start empty.
// It returns once meshid-ca is ready.
func runDeployedCA(t *testing.T, c *kubetest.Cluster, ns string) (*caProcess, *appsv1.Deployment) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dep, err := c.Client.AppsV1().Deployments(ns).Get(ctx, "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	spec := dep.Spec.Template.Spec
	container := spec.Containers[0]
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	// Longest mount path first, so that a nested mount wins.
	mounts := slices.Clone(container.VolumeMounts)
	slices.SortFunc(mounts, func(a, b corev1.VolumeMount) int { return len(b.MountPath) - len(a.MountPath) })
	root := t.TempDir()
	dirs := map[string]string{} // mount path -> directory
	for i, m := range mounts {
		v, ok := volumes[m.Name]
		if !ok {
			t.Fatalf("meshid-ca mounts volume %s, which its pod does not have", m.Name)
		}
		if m.SubPath != "" {
			t.Fatalf("volume %s: subPath is not emulated", m.Name)
		}
		dir := filepath.Join(root, fmt.Sprintf("volume-%d-%s", i, m.Name))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		var files map[string][]byte
		var mode *int32
		switch {
		case v.Secret != nil:
			if len(v.Secret.Items) > 0 {
				t.Fatalf("volume %s: items are not emulated", m.Name)
			}
			sec, err := c.Client.CoreV1().Secrets(ns).Get(ctx, v.Secret.SecretName, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("meshid-ca's pod would not start: its volume %s needs Secret %s/%s: %v", m.Name, ns, v.Secret.SecretName, err)
			}
			files, mode = sec.Data, v.Secret.DefaultMode
		case v.ConfigMap != nil:
			cm, err := c.Client.CoreV1().ConfigMaps(ns).Get(ctx, v.ConfigMap.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatalf("meshid-ca's pod would not start: its volume %s needs ConfigMap %s/%s: %v", m.Name, ns, v.ConfigMap.Name, err)
			}
			files = map[string][]byte{}
			for k, d := range cm.Data {
				files[k] = []byte(d)
			}
			mode = v.ConfigMap.DefaultMode
		case v.EmptyDir != nil, v.PersistentVolumeClaim != nil:
		default:
			t.Fatalf("volume %s: its kind is not emulated", m.Name)
		}
		perm := os.FileMode(0o644)
		if mode != nil {
			perm = os.FileMode(*mode)
		}
		for name, data := range files {
			if err := os.WriteFile(filepath.Join(dir, name), data, perm); err != nil {
				t.Fatal(err)
			}
		}
		dirs[m.MountPath] = dir
	}
	args := slices.Clone(container.Args)
	for i, arg := range args {
		flag, value, ok := strings.Cut(arg, "=")
		if !ok {
			continue
		}
		for _, m := range mounts {
			if value == m.MountPath || strings.HasPrefix(value, m.MountPath+"/") {
				args[i] = flag + "=" + dirs[m.MountPath] + strings.TrimPrefix(value, m.MountPath)
				break
			}
		}
	}
	args = append(args, "--kubeconfig="+c.KubeconfigFor(t, ns, spec.ServiceAccountName), "--namespace="+ns)
	p := startCA(t, args...)
	p.WaitReady(t, 60*time.Second)
	return p, dep
}

// waitBundle waits, watching, until the ConfigMap bundle of each namespace
// holds root (PEM) as its root-cert.pem.
func waitBundle(t *testing.T, c *kubetest.Cluster, bundle, root string, namespaces ...string) {
	t.Helper()
	for _, ns := range namespaces {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		lw := cache.NewListWatchFromClient(c.Client.CoreV1().RESTClient(), "configmaps", ns, fields.OneTermEqualSelector("metadata.name", bundle))
		_, err := watchtools.UntilWithSync(ctx, lw, &corev1.ConfigMap{}, nil, func(ev watch.Event) (bool, error) {
			cm, ok := ev.Object.(*corev1.ConfigMap)
			return ok && ev.Type != watch.Deleted && cm.Data["root-cert.pem"] == root, nil
		})
		cancel()
		if err != nil {
			t.Fatalf("no ConfigMap %s with the CA's root in %s after 60s: %v", bundle, ns, err)
		}
	}
}
