package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/chart"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/pgtest"
	"github.com/meshid/meshid/internal/poll"
	"github.com/meshid/meshid/internal/steptest"
)

var chartDir = filepath.Join("..", "deploy", "charts", "meshid")

// chartVariants are the value sets the tests render, lint and (some)
// install, beside the defaults; YAML as in a values file.
var chartVariants = map[string]string{
	"defaults": "",
	// One replica with its CA plugged in and a SQLite ledger, in other
	// namespaces, no agent.
	"plugin-sqlite-no-agent": `
namespaces: {ca: mesh-ca, agent: mesh-node}
ca:
  replicas: 1
  caSource: plugin
  pluginSecretName: istio-cacerts
  # No Secret access at all: no JWT-SVID keys to keep either.
  jwt: {enabled: false}
  nodeSelector: {kubernetes.io/os: linux}
  tolerations: [{key: dedicated, operator: Equal, value: mesh, effect: NoSchedule}]
ledger: {type: sqlite}
agent: {enabled: false}
admin: {extraServiceAccounts: [ops/meshid-oncall]}
`,
	// Your own CA in a Secret, the ledger URL under another name, the
	// namespaces made by you, the bundle beside istiod's (deploy/istio.md).
	"secret-own-namespaces": `
trustDomain: example.org
bundleConfigMap: meshid-ca-root-cert
namespaces: {create: false}
ca: {caSource: secret, secretName: my-ca}
ledger: {postgres: {secretName: ledger-url, secretKey: url}}
`,
	"sqlite-pvc": `
ca: {replicas: 1}
ledger: {type: sqlite, sqlite: {existingClaim: meshid-ledger}}
`,
	"ambient": `
ambient: {nodeProxyServiceAccounts: [istio-system/ztunnel, istio-system/ztunnel-canary]}
`,
	// Under step-ca, one replica on SQLite, no agent.
	"step": `
ca: {replicas: 1, caSource: step, step: {url: "https://step-ca.pki.svc:9000"}}
ledger: {type: sqlite}
agent: {enabled: false}
`,
	// Ambient's node proxies and remote clusters, one replica on SQLite.
	"ambient-multicluster": `
ca: {replicas: 1}
ledger: {type: sqlite}
ambient: {nodeProxyServiceAccounts: [istio-system/ztunnel]}
multicluster: {remoteSecretSelector: istio/multiCluster=true, remoteBundleConfigMaps: true}
`,
	// Federating with a SPIRE trust domain.
	"federation": `
federation:
  federatesWith:
  - trustDomain: spire.example
    bundleEndpointURL: https://spire.example:8443
    bundleEndpointProfile: {type: https_spiffe, endpointSPIFFEID: "spiffe://spire.example/spire/server"}
    trustDomainBundle: '{"keys":[]}'
`,
	// The pod-certificate signer and its trust bundle; no JWT-SVIDs.
	"pod-certificates-no-jwt": `
podCertificates: {enabled: true, signerName: mesh.example.org/spiffe}
ca: {jwt: {enabled: false}}
`,
	"pinned-images-text-logs-no-admin": `
logFormat: text
logLevel: debug
imagePullSecrets: [regcred]
ca:
  image: {tag: v0.1.0, pullPolicy: Always}
  resources: {requests: {cpu: 1, memory: 1Gi}}
  extraArgs: [--default-cert-ttl=12h]
agent:
  image: {repository: registry.example.org:5000/mesh/agent, tag: "1.2"}
  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: mesh, operator: Exists}]}]}}}
admin: {serviceAccount: {create: false, name: ""}}
`,
}

// chartValues parses values in YAML.
func chartValues(t *testing.T, values string) map[string]any {
	t.Helper()
	vals := map[string]any{}
	if err := yaml.Unmarshal([]byte(values), &vals); err != nil {
		t.Fatalf("values %q: %v", values, err)
	}
	return vals
}

// renderChart renders the chart with Helm's SDK, as helm install does,
// and returns its objects in helm install's order.
func renderChart(t *testing.T, values string) []*unstructured.Unstructured {
	t.Helper()
	manifests, err := chart.Render(chartDir, chartValues(t, values))
	if err != nil {
		t.Fatalf("rendering the chart with %q: %v", values, err)
	}
	objs, err := chart.Objects(manifests)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// findObject returns the object of kind and name in objs, or nil.
func findObject(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	return nil
}

// typed converts obj into out (a *appsv1.Deployment, say).
func typed(t *testing.T, obj *unstructured.Unstructured, out any) {
	t.Helper()
	if obj == nil {
		t.Fatalf("no object to convert into %T", out)
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj.Object, out); err != nil {
		t.Fatal(err)
	}
}

// TestHelmLint runs helm lint (Helm's own lint package) over the chart with
// its defaults and each variant: no warning, no error.
func TestHelmLint(t *testing.T) {
	for name, values := range chartVariants {
		t.Run(name, func(t *testing.T) {
			linter := lint.All(chartDir, chartValues(t, values), "default", false)
			for _, m := range linter.Messages {
				if m.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", m)
				} else {
					t.Logf("helm lint: %s", m)
				}
			}
		})
	}
	// Values the schema refuses are lint errors. (The templates' own
	// checks, fail, are not: lint renders in a mode that only logs them;
	// TestHelmSchema has them stop helm install.)
	linter := lint.All(chartDir, chartValues(t, "ca: {replicas: two}"), "default", false)
	if linter.HighestSeverity != support.ErrorSev {
		t.Errorf("helm lint passes ca.replicas two: %v", linter.Messages)
	}
}

// TestHelmSchema: values.schema.json and the chart's own checks refuse bad
// values before anything is rendered, saying which value and why.
func TestHelmSchema(t *testing.T) {
	for _, tc := range []struct {
		values string
		want   []string // in the error
	}{
		{`ca: {replicas: "two"}`, []string{"/ca/replicas", "got string, want integer"}},
		{`ca: {replicas: 0}`, []string{"/ca/replicas", "minimum"}},
		{`ca: {replica: 2}`, []string{"/ca", "additional properties 'replica' not allowed"}},
		{`replicas: 2`, []string{"additional properties 'replicas' not allowed"}},
		{`ca: {caSource: vault}`, []string{"/ca/caSource", "value must be one of 'generated', 'secret', 'plugin'"}},
		{`ledger: {type: mysql}`, []string{"/ledger/type", "value must be one of 'postgres', 'sqlite'"}},
		{`ambient: {nodeProxyServiceAccounts: [ztunnel]}`, []string{"/ambient/nodeProxyServiceAccounts/0", "does not match pattern"}},
		{`agent: {enabled: "yes"}`, []string{"/agent/enabled", "got string, want boolean"}},
		{`namespaces: {ca: Meshid_System}`, []string{"/namespaces/ca", "does not match pattern"}},
		{`logLevel: verbose`, []string{"/logLevel", "value must be one of"}},
		{`bundleConfigMap: ""`, []string{"/bundleConfigMap", "minLength"}},
		{`ca: {extraArgs: [-v]}`, []string{"/ca/extraArgs/0", "does not match pattern"}},
		// Checks across values, by the chart's templates.
		{`ledger: {type: sqlite}`, []string{"ledger.type sqlite needs ca.replicas 1, not 2"}},
		{`namespaces: {agent: meshid-system}`, []string{"namespaces.ca and namespaces.agent are both meshid-system"}},
		{`admin: {serviceAccount: {name: ""}}`, []string{"admin.serviceAccount.create is true but admin.serviceAccount.name is empty"}},
	} {
		_, err := chart.Render(chartDir, chartValues(t, tc.values))
		if err == nil {
			t.Errorf("values %s rendered", tc.values)
			continue
		}
		for _, want := range tc.want {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("values %s: error does not say %q:\n%v", tc.values, want, err)
			}
		}
		t.Logf("%s:\n%v", tc.values, err)
	}
}

// TestHelmRender checks what each variant's values change in the render.
func TestHelmRender(t *testing.T) {
	args := func(t *testing.T, objs []*unstructured.Unstructured) []string {
		var dep appsv1.Deployment
		typed(t, findObject(objs, "Deployment", "meshid-ca"), &dep)
		return dep.Spec.Template.Spec.Containers[0].Args
	}
	kinds := func(objs []*unstructured.Unstructured) map[string]int {
		n := map[string]int{}
		for _, o := range objs {
			n[o.GetKind()]++
		}
		return n
	}
	secretRules := func(t *testing.T, objs []*unstructured.Unstructured, ns string) []string {
		role := findObject(objs, "Role", "meshid-ca")
		if role == nil || role.GetNamespace() != ns {
			t.Fatalf("no Role meshid-ca in %s", ns)
		}
		var got []string
		rules, _, _ := unstructured.NestedSlice(role.Object, "rules")
		for _, r := range rules {
			r := r.(map[string]any)
			if slices.Contains(toStrings(r["resources"]), "secrets") {
				got = append(got, fmt.Sprintf("%v %v", toStrings(r["resourceNames"]), toStrings(r["verbs"])))
			}
		}
		return got
	}

	t.Run("defaults", func(t *testing.T) {
		objs := renderChart(t, chartVariants["defaults"])
		a := args(t, objs)
		for _, want := range []string{"--ca-source=secret", "--secret-name=meshid-ca", "--ledger=postgres", "--ledger-dsn-file=/etc/meshid/ledger/dsn", "--admin-service-accounts=meshid-system/meshid-admin", "--trust-domain=cluster.local"} {
			if !slices.Contains(a, want) {
				t.Errorf("meshid-ca args %q lack %s", a, want)
			}
		}
		for _, arg := range a {
			if strings.HasPrefix(arg, "--node-proxy-service-accounts") {
				t.Errorf("meshid-ca gets %s with no node proxy account in the values", arg)
			}
		}
		if got := secretRules(t, objs, "meshid-system"); !slices.Equal(got, []string{"[meshid-ca] [get update]", "[meshid-ca-jwt-keys] [get update]", "[] [create]"}) {
			t.Errorf("generated CA: secret rules %q", got)
		}
		if n := kinds(objs); n["Namespace"] != 2 || n["DaemonSet"] != 1 || n["PodDisruptionBudget"] != 1 {
			t.Errorf("defaults render %v", n)
		}
	})

	t.Run("plugin-sqlite-no-agent", func(t *testing.T) {
		objs := renderChart(t, chartVariants["plugin-sqlite-no-agent"])
		a := args(t, objs)
		for _, want := range []string{"--ca-source=plugin", "--plugin-dir=/etc/cacerts", "--ledger=sqlite", "--ledger-dsn=/var/lib/meshid/ledger.db", "--admin-service-accounts=mesh-ca/meshid-admin,ops/meshid-oncall"} {
			if !slices.Contains(a, want) {
				t.Errorf("meshid-ca args %q lack %s", a, want)
			}
		}
		var dep appsv1.Deployment
		typed(t, findObject(objs, "Deployment", "meshid-ca"), &dep)
		spec := dep.Spec.Template.Spec
		if dep.Namespace != "mesh-ca" || *dep.Spec.Replicas != 1 || dep.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
			t.Errorf("meshid-ca in %s, %d replicas, strategy %q; want mesh-ca, 1, Recreate", dep.Namespace, *dep.Spec.Replicas, dep.Spec.Strategy.Type)
		}
		vols := map[string]corev1.Volume{}
		for _, v := range spec.Volumes {
			vols[v.Name] = v
		}
		if vols["ledger"].EmptyDir == nil || vols["cacerts"].Secret == nil || vols["cacerts"].Secret.SecretName != "istio-cacerts" {
			t.Errorf("volumes %+v: want an emptyDir ledger and the Secret istio-cacerts", spec.Volumes)
		}
		if spec.NodeSelector["kubernetes.io/os"] != "linux" || len(spec.Tolerations) != 1 || spec.Tolerations[0].Key != "dedicated" {
			t.Errorf("nodeSelector %v, tolerations %v", spec.NodeSelector, spec.Tolerations)
		}
		if got := secretRules(t, objs, "mesh-ca"); len(got) != 0 {
			t.Errorf("plug-in CA: meshid-ca may still use Secrets: %q", got)
		}
		n := kinds(objs)
		if n["DaemonSet"] != 0 || n["PodDisruptionBudget"] != 0 || n["Namespace"] != 1 || findObject(objs, "ServiceAccount", "meshid-agent") != nil || findObject(objs, "ClusterRoleBinding", "meshid-agent-auth-delegator") != nil {
			t.Errorf("agent off, 1 replica: render %v", n)
		}
		vap := findObject(objs, "ValidatingAdmissionPolicy", "meshid-ca-configmaps")
		conds, _, _ := unstructured.NestedSlice(vap.Object, "spec", "matchConditions")
		if expr := conds[0].(map[string]any)["expression"]; expr != `request.userInfo.username == "system:serviceaccount:mesh-ca:meshid-ca"` {
			t.Errorf("admission policy matches %v", expr)
		}
		for _, o := range objs {
			if ns := o.GetNamespace(); ns != "" && ns != "mesh-ca" {
				t.Errorf("%s %s in %s", o.GetKind(), o.GetName(), ns)
			}
		}
	})

	t.Run("secret-own-namespaces", func(t *testing.T) {
		objs := renderChart(t, chartVariants["secret-own-namespaces"])
		if n := kinds(objs); n["Namespace"] != 0 {
			t.Errorf("namespaces.create false renders %d Namespaces", n["Namespace"])
		}
		a := args(t, objs)
		for _, want := range []string{"--ca-source=secret", "--secret-name=my-ca", "--ledger-dsn-file=/etc/meshid/ledger/url", "--trust-domain=example.org", "--bundle-configmap=meshid-ca-root-cert"} {
			if !slices.Contains(a, want) {
				t.Errorf("meshid-ca args %q lack %s", a, want)
			}
		}
		if got := secretRules(t, objs, "meshid-system"); !slices.Equal(got, []string{"[my-ca] [get update]", "[meshid-ca-jwt-keys] [get update]", "[] [create]"}) {
			t.Errorf("existing CA Secret: secret rules %q, want get and update of my-ca, and of the JWT keys' Secret, which it creates", got)
		}
		var ds appsv1.DaemonSet
		typed(t, findObject(objs, "DaemonSet", "meshid-agent"), &ds)
		if !slices.Contains(ds.Spec.Template.Spec.Containers[0].Args, "--trust-domain=example.org") {
			t.Errorf("meshid-agent args %q", ds.Spec.Template.Spec.Containers[0].Args)
		}
		for _, v := range ds.Spec.Template.Spec.Volumes {
			if v.Name == "ca-root" && (v.ConfigMap == nil || v.ConfigMap.Name != "meshid-ca-root-cert") {
				t.Errorf("meshid-agent's root volume %+v, want the ConfigMap meshid-ca-root-cert", v)
			}
		}
		bundleRole := findObject(objs, "ClusterRole", "meshid-ca-bundle")
		rules, _, _ := unstructured.NestedSlice(bundleRole.Object, "rules")
		if names := toStrings(rules[1].(map[string]any)["resourceNames"]); !slices.Equal(names, []string{"meshid-ca-root-cert"}) {
			t.Errorf("meshid-ca-bundle names ConfigMaps %q", names)
		}
	})

	t.Run("sqlite-pvc", func(t *testing.T) {
		var dep appsv1.Deployment
		typed(t, findObject(renderChart(t, chartVariants["sqlite-pvc"]), "Deployment", "meshid-ca"), &dep)
		for _, v := range dep.Spec.Template.Spec.Volumes {
			if v.Name == "ledger" && (v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != "meshid-ledger") {
				t.Errorf("ledger volume %+v, want the claim meshid-ledger", v)
			}
		}
	})

	t.Run("ambient", func(t *testing.T) {
		a := args(t, renderChart(t, chartVariants["ambient"]))
		if !slices.Contains(a, "--node-proxy-service-accounts=istio-system/ztunnel,istio-system/ztunnel-canary") {
			t.Errorf("meshid-ca args %q lack the node proxy accounts", a)
		}
	})

	t.Run("pinned-images-text-logs-no-admin", func(t *testing.T) {
		objs := renderChart(t, chartVariants["pinned-images-text-logs-no-admin"])
		var dep appsv1.Deployment
		typed(t, findObject(objs, "Deployment", "meshid-ca"), &dep)
		var ds appsv1.DaemonSet
		typed(t, findObject(objs, "DaemonSet", "meshid-agent"), &ds)
		c, ac := dep.Spec.Template.Spec.Containers[0], ds.Spec.Template.Spec.Containers[0]
		if c.Image != "localhost/meshid/meshid-ca:v0.1.0" || c.ImagePullPolicy != corev1.PullAlways || ac.Image != "registry.example.org:5000/mesh/agent:1.2" {
			t.Errorf("images %s (%s), %s", c.Image, c.ImagePullPolicy, ac.Image)
		}
		for _, a := range [][]string{c.Args, ac.Args} {
			if !slices.Contains(a, "--log-format=text") || !slices.Contains(a, "--log-level=debug") {
				t.Errorf("args %q lack the log settings", a)
			}
		}
		if c.Args[len(c.Args)-1] != "--default-cert-ttl=12h" {
			t.Errorf("meshid-ca's extra argument is not last: %q", c.Args)
		}
		for _, arg := range c.Args {
			if strings.HasPrefix(arg, "--admin-service-accounts") {
				t.Errorf("no admin account, yet %s", arg)
			}
		}
		if findObject(objs, "ServiceAccount", "meshid-admin") != nil {
			t.Error("admin.serviceAccount.create false, yet meshid-admin is rendered")
		}
		// Values merge into the defaults: the limit stays.
		if c.Resources.Requests.Cpu().String() != "1" || c.Resources.Requests.Memory().String() != "1Gi" || c.Resources.Limits.Memory().String() != "512Mi" {
			t.Errorf("meshid-ca resources %v", c.Resources)
		}
		if ps := dep.Spec.Template.Spec.ImagePullSecrets; len(ps) != 1 || ps[0].Name != "regcred" {
			t.Errorf("imagePullSecrets %v", ps)
		}
		if ds.Spec.Template.Spec.Affinity == nil || ds.Spec.Template.Spec.Affinity.NodeAffinity == nil {
			t.Error("meshid-agent has no node affinity")
		}
	})

	// NOTES.txt renders for each variant and names the ledger's Secret when
	// there is one to create.
	for name, values := range chartVariants {
		notes, err := chart.Notes(chartDir, chartValues(t, values))
		if err != nil {
			t.Errorf("%s: NOTES.txt: %v", name, err)
		}
		if strings.Contains(values, "sqlite") == strings.Contains(notes, "create secret generic") {
			t.Errorf("%s: NOTES.txt:\n%s", name, notes)
		}
	}
}

func toStrings(v any) []string {
	var out []string
	items, _ := v.([]any)
	for _, x := range items {
		out = append(out, fmt.Sprint(x))
	}
	return out
}

// TestHelmBaseMatchesChart: deploy/base is generated from the chart's
// default render (go run ./hack/gen-deploy-base). Built with kustomize, it
// must describe the same objects as helm install with the defaults, field
// for field; and its files must be what the generator writes now.
func TestHelmBaseMatchesChart(t *testing.T) {
	const regenerate = "deploy/base is generated from deploy/charts/meshid: run go run ./hack/gen-deploy-base"
	key := func(o *unstructured.Unstructured) string {
		return fmt.Sprintf("%s %s %s/%s", o.GetAPIVersion(), o.GetKind(), o.GetNamespace(), o.GetName())
	}
	index := func(objs []*unstructured.Unstructured) map[string]any {
		m := map[string]any{}
		for _, o := range objs {
			// Through JSON, so that numbers compare equal whichever
			// parser read them.
			b, err := json.Marshal(o.Object)
			if err != nil {
				t.Fatal(err)
			}
			var v any
			if err := json.Unmarshal(b, &v); err != nil {
				t.Fatal(err)
			}
			if _, dup := m[key(o)]; dup {
				t.Errorf("%s twice", key(o))
			}
			m[key(o)] = v
		}
		return m
	}
	base := index(kustomize(t, filepath.Join("..", "deploy", "base")))
	rendered := index(renderChart(t, ""))
	keys := unionKeys(base, rendered)
	for _, k := range keys {
		b, inBase := base[k]
		r, inChart := rendered[k]
		switch {
		case !inBase:
			t.Errorf("%s: rendered by the chart, not in deploy/base", k)
		case !inChart:
			t.Errorf("%s: in deploy/base, not rendered by the chart", k)
		default:
			for _, d := range diffValues("", b, r) {
				t.Errorf("%s: %s", k, d)
			}
		}
	}
	if len(keys) < 10 {
		t.Errorf("only %d objects compared", len(keys))
	}

	files, err := chart.Base(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	onDisk, err := filepath.Glob(filepath.Join("..", "deploy", "base", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range onDisk {
		if _, ok := files[filepath.Base(path)]; !ok {
			t.Errorf("%s is not generated from the chart", path)
		}
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join("..", "deploy", "base", name))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("deploy/base/%s differs from the generator's output (%v)", name, err)
		}
	}
	if t.Failed() {
		t.Log(regenerate)
	}
}

// unionKeys is the keys of a and b, sorted, each once.
func unionKeys[V any](a, b map[string]V) []string {
	keys := slices.AppendSeq(slices.Collect(maps.Keys(a)), maps.Keys(b))
	slices.Sort(keys)
	return slices.Compact(keys)
}

// diffValues lists where a (deploy/base) and b (the chart) differ.
func diffValues(path string, a, b any) []string {
	am, aMap := a.(map[string]any)
	bm, bMap := b.(map[string]any)
	if aMap && bMap {
		var out []string
		for _, k := range unionKeys(am, bm) {
			av, aok := am[k]
			bv, bok := bm[k]
			switch {
			case !aok:
				out = append(out, fmt.Sprintf("%s.%s: only the chart has it (%v)", path, k, bv))
			case !bok:
				out = append(out, fmt.Sprintf("%s.%s: only deploy/base has it (%v)", path, k, av))
			default:
				out = append(out, diffValues(path+"."+k, av, bv)...)
			}
		}
		return out
	}
	as, aSlice := a.([]any)
	bs, bSlice := b.([]any)
	if aSlice && bSlice && len(as) == len(bs) {
		var out []string
		for i := range as {
			out = append(out, diffValues(fmt.Sprintf("%s[%d]", path, i), as[i], bs[i])...)
		}
		return out
	}
	if !reflect.DeepEqual(a, b) {
		return []string{fmt.Sprintf("%s: deploy/base has %v, the chart %v", path, a, b)}
	}
	return nil
}

// TestHelmInstall renders the chart with Helm's SDK, applies it to a real
// kube-apiserver with server-side apply (twice), and runs meshid-ca as the
// rendered Deployment would run it (runDeployedCA: its arguments, its
// service account's RBAC, its Secrets mounted) until it is ready, has
// written the trust bundle and signed a certificate; once with the
// defaults and with three variants. TestDeployManifests checks the
// defaults further (all of RBAC, Istio's agent), through deploy/base, which
// TestHelmBaseMatchesChart holds to the same objects.
func TestHelmInstall(t *testing.T) {
	kubetest.RequireAssets(t)
	ctx := context.Background()

	t.Run("defaults", func(t *testing.T) {
		dsn := pgtest.Database(t)
		cluster := kubetest.Start(t)
		newApplier(t, cluster).applyTwice(t, renderChart(t, chartVariants["defaults"]))
		checkPodSecurity(t, cluster, "meshid-system", "meshid-node")
		createSecret(t, cluster, "meshid-system", "meshid-ledger", map[string][]byte{"dsn": []byte(dsn)})
		p, dep := runDeployedCA(t, cluster, "meshid-system")
		checkHardened(t, dep)
		sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("meshid-ca ready, without its generated Secret: %v", err)
		}
		if p.AdminAddr == "" {
			t.Error("no admin API")
		}
		checkIssues(t, cluster, p, "istio-ca-root-cert", string(sec.Data["root-cert.pem"]), "cluster.local")
	})

	t.Run("plugin-sqlite-no-agent", func(t *testing.T) {
		cluster := kubetest.Start(t)
		newApplier(t, cluster).applyTwice(t, renderChart(t, chartVariants["plugin-sqlite-no-agent"]))
		checkPodSecurity(t, cluster, "mesh-ca", "")
		checkConfigMapPolicy(t, cluster, "mesh-ca", "istio-ca-root-cert")
		for _, attr := range []authorizationv1.ResourceAttributes{
			{Namespace: "mesh-ca", Resource: "secrets", Verb: "create"},
			{Namespace: "mesh-ca", Resource: "secrets", Name: "istio-cacerts", Verb: "get"},
			{Namespace: "mesh-ca", Resource: "secrets", Name: "meshid-ca", Verb: "get"},
		} {
			checkAccess(t, cluster, "mesh-ca/meshid-ca", attr, false)
		}
		checkAccess(t, cluster, "mesh-ca/meshid-ca", authorizationv1.ResourceAttributes{Namespace: "mesh-ca", Group: "coordination.k8s.io", Resource: "leases", Name: "meshid-ca-leader", Verb: "update"}, true)
		// The plug-in CA, in Istio's cacerts layout (no root key).
		files := caFiles(t, "cluster.local")
		delete(files, keys.RootKeyFile)
		createSecret(t, cluster, "mesh-ca", "istio-cacerts", files)
		p, _ := runDeployedCA(t, cluster, "mesh-ca")
		if p.AdminAddr == "" {
			t.Error("no admin API")
		}
		checkIssues(t, cluster, p, "istio-ca-root-cert", string(files[keys.RootCertFile]), "cluster.local")
		secrets, err := cluster.Client.CoreV1().Secrets("mesh-ca").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(secrets.Items) != 1 {
			t.Errorf("%d Secrets in mesh-ca, want only istio-cacerts", len(secrets.Items))
		}
	})

	t.Run("step-ca", func(t *testing.T) {
		s := steptest.Start(t, steptest.Options{})
		cluster := kubetest.Start(t)
		values := strings.Replace(chartVariants["step"], "https://step-ca.pki.svc:9000", s.URL, 1)
		newApplier(t, cluster).applyTwice(t, renderChart(t, values))
		createSecret(t, cluster, "meshid-system", "meshid-step", map[string][]byte{
			"root_ca.crt": ca.EncodePEM(s.Root), "password": []byte(s.Provisioner.Password)})
		p, _ := runDeployedCA(t, cluster, "meshid-system")
		checkIssues(t, cluster, p, "istio-ca-root-cert", string(ca.EncodePEM(s.Root)), "cluster.local")
		sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("the intermediate is not kept in the Secret: %v", err)
		}
		if _, ok := sec.Data[keys.RootKeyFile]; ok {
			t.Error("the Secret holds a root key under step-ca")
		}
	})

	t.Run("ambient-multicluster", func(t *testing.T) {
		cluster := kubetest.Start(t)
		newApplier(t, cluster).applyTwice(t, renderChart(t, chartVariants["ambient-multicluster"]))
		// Remote clusters' Secrets, and every pod (node proxies' checks).
		for _, attr := range []authorizationv1.ResourceAttributes{
			{Namespace: "meshid-system", Resource: "secrets", Verb: "list"},
			{Namespace: "meshid-system", Resource: "secrets", Verb: "watch"},
			{Resource: "pods", Verb: "watch"},
		} {
			checkAccess(t, cluster, "meshid-system/meshid-ca", attr, true)
		}
		checkAccess(t, cluster, "meshid-system/meshid-ca", authorizationv1.ResourceAttributes{Namespace: "kube-system", Resource: "secrets", Verb: "list"}, false)
		p, _ := runDeployedCA(t, cluster, "meshid-system")
		sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkIssues(t, cluster, p, "istio-ca-root-cert", string(sec.Data["root-cert.pem"]), "cluster.local")
		// ztunnel gets the certificate of a workload on its node.
		cluster.Node(t, "node-a")
		ztunnel := cluster.Pod(t, "istio-system", "ztunnel-a", "ztunnel", "node-a")
		cluster.Pod(t, "shop", "web-1", "web", "node-a")
		roots, err := ca.ParseCertificatesPEM(sec.Data["root-cert.pem"])
		if err != nil {
			t.Fatal(err)
		}
		z := newZtunnelClient(t, p.GRPCAddr, roots, cluster.PodToken(t, ztunnel, "istio-ca"))
		poll.Until(t, "ztunnel served once the pod watch has the pods", func() bool {
			_, _, err := z.fetch(t, "spiffe://cluster.local/ns/shop/sa/web")
			return err == nil
		})
	})

	t.Run("secret-own-namespaces", func(t *testing.T) {
		dsn := pgtest.Database(t)
		cluster := kubetest.Start(t)
		// The namespaces, as their administrator makes them (deploy/README.md).
		for ns, level := range map[string]string{"meshid-system": "restricted", "meshid-node": "privileged"} {
			_, err := cluster.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{
				"pod-security.kubernetes.io/enforce": level, "pod-security.kubernetes.io/warn": "restricted",
			}}}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
		}
		files := caFiles(t, "example.org")
		createSecret(t, cluster, "meshid-system", "my-ca", files)
		createSecret(t, cluster, "meshid-system", "ledger-url", map[string][]byte{"url": []byte(dsn)})
		newApplier(t, cluster).applyTwice(t, renderChart(t, chartVariants["secret-own-namespaces"]))
		checkPodSecurity(t, cluster, "meshid-system", "meshid-node")
		// It creates no CA Secret, but does create the JWT keys' one (RBAC
		// cannot limit create by name).
		checkAccess(t, cluster, "meshid-system/meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Verb: "create"}, true)
		checkAccess(t, cluster, "meshid-system/meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Name: "my-ca", Verb: "update"}, true)
		checkAccess(t, cluster, "meshid-system/meshid-ca", authorizationv1.ResourceAttributes{Namespace: "meshid-system", Resource: "secrets", Name: "meshid-ca-jwt-keys", Verb: "update"}, true)
		checkConfigMapPolicy(t, cluster, "meshid-system", "meshid-ca-root-cert")
		p, _ := runDeployedCA(t, cluster, "meshid-system")
		checkIssues(t, cluster, p, "meshid-ca-root-cert", string(files[keys.RootCertFile]), "example.org")
	})
}

// caFiles generates a CA for trustDomain in meshid's files (Istio's
// cacerts layout plus root-key.pem).
func caFiles(t *testing.T, trustDomain string) map[string][]byte {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: trustDomain})
	if err != nil {
		t.Fatal(err)
	}
	files, err := m.Files()
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// checkIssues checks a meshid-ca run by runDeployedCA: elected through its
// Lease, it writes root into the trust bundle (ConfigMap bundle) of the
// workloads' namespaces, and it signs a certificate for a workload's token.
func checkIssues(t *testing.T, c *kubetest.Cluster, p *caProcess, bundle, root, trustDomain string) {
	t.Helper()
	c.ServiceAccount(t, "shop", "web")
	waitBundle(t, c, bundle, root, "shop", "default")
	roots, err := ca.ParseCertificatesPEM([]byte(root))
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://" + trustDomain + "/ns/shop/sa/web")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	chain, err := sign(ctx, p.Client(t, roots), id, c.Token(t, "shop", "web", "istio-ca"))
	if err != nil {
		t.Fatalf("signing for %s: %v", id, err)
	}
	if last := chain[len(chain)-1]; last.Equal(roots[0]) {
		chain = chain[:len(chain)-1]
	}
	verifySVID(t, "a certificate from the installed meshid-ca", append(chain, roots[0]), spiffeid.RequireTrustDomainFromString(trustDomain), roots, id)
}
