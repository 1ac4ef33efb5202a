package clustere2e

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/cli"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/meshid/meshid/internal/cluster"
	"github.com/meshid/meshid/internal/kubetest"
)

const (
	release     = "meshid"
	caNS        = "meshid-system"
	agentNS     = "meshid-node"
	trustDomain = "cluster.local"
	bundleCM    = "istio-ca-root-cert"
	// Workload certificates live this long, so that they rotate (at half
	// life) within the test.
	certTTL = 100 * time.Second
)

// run is one test's shared state.
type run struct {
	t       *testing.T
	c       *cluster.Cluster
	cfg     *rest.Config
	kube    kubernetes.Interface
	ns      string // the workloads' namespace
	begin   time.Time
	events  []event // the Ready timeline
	ctlConn []string
	// pilotSerial is the certificate pilot-agent served.
	pilotSerial string
	// podCerts: the cluster serves PodCertificateRequests, and meshid signs them.
	podCerts bool
	caArgs   []any // extra meshid-ca flags
}

type event struct {
	at   time.Time
	what string
}

func (r *run) mark(what string) {
	r.events = append(r.events, event{time.Now(), what})
	r.t.Logf("%6.1fs %s", time.Since(r.begin).Seconds(), what)
}

func (r *run) id(sa string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, r.ns, sa)
}

// TestMeshidOnCluster installs the chart and checks, in order: install and
// readiness under Pod Security; the bundle ConfigMap; Istio's pilot-agent
// served over SDS; the attack on another pod's identity and a deleted pod's
// renewals; go-spiffe mTLS across a rotation; meshidctl through
// port-forward; the leader killed with no certificate lapsing; every
// certificate a workload held being in the ledger.
func TestMeshidOnCluster(t *testing.T) {
	r := newRun(t)
	r.cleanPrevious()
	r.install()
	t.Cleanup(r.uninstall)
	r.waitReady()
	r.checkPodSecurity()

	r.startWorkloads()
	r.checkBundle()
	r.checkPodCertificates()
	r.checkPilotAgent()
	deletedAt := r.attack()
	r.checkMTLSRotation()
	r.checkMeshidctl()
	r.killLeader()
	r.checkDeletedNotRenewed(deletedAt)
	r.checkLedgerHoldsEverything()
	r.report()
}

// newRun connects to the cluster and imports the images.
func newRun(t *testing.T) *run {
	c := needCluster(t)
	cfg, err := c.RESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	suffix := make([]byte, 3)
	rand.Read(suffix)
	r := &run{t: t, c: c, cfg: cfg, kube: kube, ns: "e2e-" + hex.EncodeToString(suffix), begin: time.Now()}
	t.Logf("images built in %s", build.prepared.Round(time.Second))
	if err := c.Import(context.Background(), build.images...); err != nil {
		t.Fatal(err)
	}
	r.mark("images imported into the node's containerd")
	return r
}

// cleanPrevious removes what an earlier run on this cluster left: the
// release, its namespaces, old test namespaces.
func (r *run) cleanPrevious() {
	ctx := context.Background()
	ac := r.helm()
	if _, err := action.NewGet(ac).Run(release); err == nil {
		if _, err := action.NewUninstall(ac).Run(release); err != nil {
			r.t.Fatalf("uninstalling an earlier release: %v", err)
		}
	}
	nss, err := r.kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	var gone []string
	for _, n := range nss.Items {
		if n.Name == caNS || n.Name == agentNS || strings.HasPrefix(n.Name, "e2e-") {
			if err := r.kube.CoreV1().Namespaces().Delete(ctx, n.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				r.t.Fatal(err)
			}
			gone = append(gone, n.Name)
		}
	}
	for _, n := range gone {
		eventually(r.t, deadline, "namespace "+n+" of an earlier run deleted", func() error {
			_, err := r.kube.CoreV1().Namespaces().Get(ctx, n, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("still there (%v)", err)
		})
	}
}

func (r *run) helm() *action.Configuration {
	settings := cli.New()
	settings.KubeConfig = r.c.Kubeconfig()
	ac := new(action.Configuration)
	if err := ac.Init(settings.RESTClientGetter(), "default", "secret", func(format string, v ...any) {}); err != nil {
		r.t.Fatal(err)
	}
	return ac
}

// install runs the chart's documented steps (deploy/README.md): helm
// install with the default values but short workload certificates, then
// the ledger's Secret, which meshid-ca's pods wait for.
func (r *run) install() {
	chrt, err := loader.Load("../../deploy/charts/meshid")
	if err != nil {
		r.t.Fatal(err)
	}
	in := action.NewInstall(r.helm())
	in.ReleaseName = release
	in.Namespace = "default"
	in.Timeout = deadline
	values := map[string]any{
		"agent": map[string]any{"extraArgs": []any{fmt.Sprintf("--cert-ttl=%s", certTTL)}},
	}
	if r.caArgs != nil {
		values["ca"] = map[string]any{"extraArgs": r.caArgs}
	}
	if r.podCerts = servesPodCertificates(r.kube); r.podCerts {
		values["podCertificates"] = map[string]any{"enabled": true, "signerName": podCertSigner}
	}
	r.mark("helm install (Helm SDK, chart defaults: 2 replicas, PostgreSQL ledger, agent DaemonSet)")
	if _, err := in.Run(chrt, values); err != nil {
		r.t.Fatalf("helm install: %v", err)
	}
	r.mark("helm install returned")
	dsn := r.c.PostgresDSN()
	if dsn == "" {
		r.t.Fatal("the cluster has no PostgreSQL (hack/cluster.sh up without --no-postgres)")
	}
	_, err = r.kube.CoreV1().Secrets(caNS).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "meshid-ledger", Namespace: caNS},
		StringData: map[string]string{"dsn": dsn},
	}, metav1.CreateOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	r.mark("Secret meshid-ledger created")
}

func (r *run) uninstall() {
	if os.Getenv("MESHID_CLUSTER_KEEP") == "1" {
		r.t.Logf("MESHID_CLUSTER_KEEP=1: release %s and namespace %s left installed", release, r.ns)
		return
	}
	if r.t.Failed() {
		r.dumpLogs()
	}
	if _, err := action.NewUninstall(r.helm()).Run(release); err != nil {
		r.t.Errorf("helm uninstall: %v", err)
	}
	ctx := context.Background()
	for _, n := range []string{r.ns, caNS, agentNS} {
		r.kube.CoreV1().Namespaces().Delete(ctx, n, metav1.DeleteOptions{})
	}
}

// dumpLogs logs the end of each meshid pod's log, for a failed run.
func (r *run) dumpLogs() {
	for _, ns := range []string{caNS, agentNS, r.ns} {
		pods, err := r.kube.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			continue
		}
		for _, p := range pods.Items {
			for _, c := range p.Spec.Containers {
				l, err := logs(r.kube, ns, p.Name, c.Name)
				if err != nil {
					l = err.Error()
				}
				lines := strings.Split(strings.TrimSpace(l), "\n")
				if len(lines) > 30 {
					lines = lines[len(lines)-30:]
				}
				r.t.Logf("--- %s/%s [%s] (%s)\n%s", ns, p.Name, c.Name, podProblems(&p), strings.Join(lines, "\n"))
			}
		}
	}
}

// waitReady waits for both meshid-ca replicas and the agent to be Ready,
// and records when each pod was scheduled, started and became Ready.
func (r *run) waitReady() {
	ctx := context.Background()
	eventually(r.t, deadline, "meshid-ca 2/2 Ready", func() error {
		d, err := r.kube.AppsV1().Deployments(caNS).Get(ctx, "meshid-ca", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.Status.ReadyReplicas != 2 {
			return fmt.Errorf("%d/2 ready; pods: %s", d.Status.ReadyReplicas, r.podsState(caNS))
		}
		return nil
	})
	eventually(r.t, deadline, "meshid-agent Ready on the node", func() error {
		ds, err := r.kube.AppsV1().DaemonSets(agentNS).Get(ctx, "meshid-agent", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.DesiredNumberScheduled != 1 || ds.Status.NumberReady != 1 {
			return fmt.Errorf("%d/%d ready; pods: %s", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled, r.podsState(agentNS))
		}
		return nil
	})
	for _, ns := range []string{caNS, agentNS} {
		pods, err := r.kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			r.t.Fatal(err)
		}
		for _, p := range pods.Items {
			for _, c := range p.Status.Conditions {
				switch c.Type {
				case corev1.PodScheduled, corev1.ContainersReady:
					r.events = append(r.events, event{c.LastTransitionTime.Time, fmt.Sprintf("%s/%s %s", ns, p.Name, c.Type)})
				}
			}
			for _, cs := range p.Status.ContainerStatuses {
				if cs.State.Running != nil {
					r.events = append(r.events, event{cs.State.Running.StartedAt.Time, fmt.Sprintf("%s/%s container %s started", ns, p.Name, cs.Name)})
				}
				if cs.RestartCount > 0 {
					r.t.Logf("%s/%s: container %s restarted %d times before Ready", ns, p.Name, cs.Name, cs.RestartCount)
				}
			}
		}
	}
	r.mark("meshid-ca 2/2 and meshid-agent 1/1 Ready")
}

func (r *run) podsState(ns string) string {
	pods, err := r.kube.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var s []string
	for _, p := range pods.Items {
		failFast(r.t, &p)
		s = append(s, fmt.Sprintf("%s %s [%s]", p.Name, p.Status.Phase, podProblems(&p)))
	}
	return strings.Join(s, ", ")
}

// checkPodSecurity: meshid-system enforces "restricted", a pod breaking it
// is refused there, and the kubelet really runs meshid-ca as the
// restricted profile says (non-root, no capabilities, no new privileges,
// seccomp, read-only root).
func (r *run) checkPodSecurity() {
	ctx := context.Background()
	ns, err := r.kube.CoreV1().Namespaces().Get(ctx, caNS, metav1.GetOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	if got := ns.Labels["pod-security.kubernetes.io/enforce"]; got != "restricted" {
		r.t.Errorf("%s enforces Pod Security %q, want restricted", caNS, got)
	}
	bad := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "root", Namespace: caNS},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "root", Image: caImage,
			SecurityContext: &corev1.SecurityContext{RunAsUser: ptr.To[int64](0), Privileged: ptr.To(true)},
		}}},
	}
	_, err = r.kube.CoreV1().Pods(caNS).Create(ctx, bad, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	if err == nil || !strings.Contains(err.Error(), "violates PodSecurity \"restricted") {
		r.t.Errorf("a privileged root pod in %s: %v, want refused by PodSecurity restricted", caNS, err)
	}
	pods, err := r.kube.CoreV1().Pods(caNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=meshid-ca"})
	if err != nil {
		r.t.Fatal(err)
	}
	procs := processes("meshid-ca")
	for _, p := range pods.Items {
		found := false
		for _, pr := range procs {
			if !pr.inPod(string(p.UID)) {
				continue
			}
			found = true
			uid := strings.Fields(pr.status["Uid"])
			if len(uid) == 0 || uid[0] != "65532" || pr.status["NoNewPrivs"] != "1" || pr.status["Seccomp"] != "2" || strings.Trim(pr.status["CapEff"], "0") != "" {
				r.t.Errorf("meshid-ca of %s runs with Uid %q NoNewPrivs %q Seccomp %q CapEff %q; want 65532, 1, 2 (filter), none",
					p.Name, pr.status["Uid"], pr.status["NoNewPrivs"], pr.status["Seccomp"], pr.status["CapEff"])
			}
			mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mounts", pr.pid))
			if err != nil {
				r.t.Fatal(err)
			}
			for _, line := range strings.Split(string(mounts), "\n") {
				f := strings.Fields(line)
				if len(f) >= 4 && f[1] == "/" && !strings.HasPrefix(f[3], "ro") {
					r.t.Errorf("meshid-ca of %s has a writable root filesystem: %s", p.Name, line)
				}
			}
		}
		if !found {
			r.t.Errorf("no meshid-ca process of pod %s found on the node", p.Name)
		}
	}
}

// Pods of the test's workloads.
func (r *run) workloadPod(name, sa string, args ...string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: r.ns, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			ServiceAccountName:            sa,
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot: ptr.To(true), RunAsUser: ptr.To[int64](65532), RunAsGroup: ptr.To[int64](65532),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{{
				Name: "workload", Image: workloadImage, ImagePullPolicy: corev1.PullNever, Args: args,
				Ports:          []corev1.ContainerPort{{Name: "status", ContainerPort: 8080}, {Name: "mtls", ContainerPort: 8443}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/status", Port: intOrString("status")}}, PeriodSeconds: 2},
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true),
					Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "meshid-socket", MountPath: "/run/meshid", ReadOnly: true},
					{Name: "istio-token", MountPath: "/var/run/secrets/tokens", ReadOnly: true},
				},
			}},
			Volumes: []corev1.Volume{
				{Name: "meshid-socket", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/run/meshid", Type: ptr.To(corev1.HostPathDirectory)}}},
				istioTokenVolume(),
			},
		},
	}
}

// istioTokenVolume is the projected token Istio's injector mounts:
// audience istio-ca, refreshed by the kubelet.
func istioTokenVolume() corev1.Volume {
	return corev1.Volume{Name: "istio-token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
			Audience: "istio-ca", ExpirationSeconds: ptr.To[int64](3600), Path: "istio-token",
		}}},
	}}}
}

// pilotPod runs Istio's pilot-agent as Istio's injector would (token and
// root mounted, environment from the pod), talking to meshid-ca directly,
// and a sidecar from which the test reads pilot-agent's SDS socket.
func (r *run) pilotPod() *corev1.Pod {
	fieldEnv := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	sdsMount := corev1.VolumeMount{Name: "workload-socket", MountPath: "/var/run/secrets/workload-spiffe-uds"}
	empty := func(name string) corev1.Volume {
		return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}
	}
	secCtx := &corev1.SecurityContext{
		AllowPrivilegeEscalation: ptr.To(false), ReadOnlyRootFilesystem: ptr.To(true),
		Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "pilot", Namespace: r.ns, Labels: map[string]string{"app": "pilot"}},
		Spec: corev1.PodSpec{
			ServiceAccountName:            "pilot",
			TerminationGracePeriodSeconds: ptr.To[int64](1),
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot: ptr.To(true), RunAsUser: ptr.To[int64](1337), RunAsGroup: ptr.To[int64](1337), FSGroup: ptr.To[int64](1337),
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{
				{
					Name: "istio-proxy", Image: pilotImage, ImagePullPolicy: corev1.PullNever,
					Args:       []string{"proxy", "sidecar", "--log_output_level=default:info"},
					WorkingDir: "/",
					Env: []corev1.EnvVar{
						{Name: "CA_ADDR", Value: "meshid-ca." + caNS + ".svc:15012"},
						{Name: "CA_ROOT_CA", Value: "/var/run/secrets/istio/root-cert.pem"},
						fieldEnv("POD_NAME", "metadata.name"), fieldEnv("POD_NAMESPACE", "metadata.namespace"),
						fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"), fieldEnv("INSTANCE_IP", "status.podIP"),
						{Name: "ISTIO_META_CLUSTER_ID", Value: "Kubernetes"},
						{Name: "TRUST_DOMAIN", Value: trustDomain},
						{Name: "JWT_POLICY", Value: "third-party-jwt"},
						{Name: "CLOUD_PLATFORM", Value: "none"},
						{Name: "SECRET_TTL", Value: certTTL.String()},
						{Name: "PROXY_CONFIG", Value: `{"statusPort":15020,"controlPlaneAuthPolicy":"NONE","binaryPath":"/usr/local/bin/envoy","discoveryAddress":"meshid-ca.` + caNS + `.svc:15012"}`},
					},
					SecurityContext: secCtx,
					VolumeMounts: []corev1.VolumeMount{
						sdsMount,
						{Name: "istio-token", MountPath: "/var/run/secrets/tokens", ReadOnly: true},
						{Name: "istiod-ca-cert", MountPath: "/var/run/secrets/istio", ReadOnly: true},
						{Name: "istio-envoy", MountPath: "/etc/istio/proxy"},
						{Name: "istio-data", MountPath: "/var/lib/istio/data"},
						{Name: "tmp", MountPath: "/tmp"},
					},
				},
				{
					// Holds the pod's SDS socket for meshidctl secrets
					// (kubectl exec).
					Name: "probe", Image: pilotImage, ImagePullPolicy: corev1.PullNever,
					Command: []string{"/usr/local/bin/pause"}, SecurityContext: secCtx,
					VolumeMounts: []corev1.VolumeMount{sdsMount},
				},
			},
			Volumes: []corev1.Volume{
				empty("workload-socket"), empty("istio-envoy"), empty("istio-data"), empty("tmp"),
				istioTokenVolume(),
				{Name: "istiod-ca-cert", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: bundleCM}}}},
			},
		},
	}
}

// startWorkloads creates the workloads' namespace and service accounts,
// and the pods: api (mTLS server for web), web (its client), victim (to be
// deleted), pilot (Istio's agent).
func (r *run) startWorkloads() {
	ctx := context.Background()
	if _, err := r.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: r.ns}}, metav1.CreateOptions{}); err != nil {
		r.t.Fatal(err)
	}
	for _, sa := range []string{"api", "web", "victim", "attacker", "pilot"} {
		if _, err := r.kube.CoreV1().ServiceAccounts(r.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			r.t.Fatal(err)
		}
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "api", Namespace: r.ns},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "api"}, Ports: []corev1.ServicePort{{Name: "mtls", Port: 8443, TargetPort: intOrString("mtls")}}},
	}
	if _, err := r.kube.CoreV1().Services(r.ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		r.t.Fatal(err)
	}
	pods := []*corev1.Pod{
		r.workloadPod("api", "api", "serve", "--peer", r.id("web")),
		r.workloadPod("web", "web", "call", "--addr", "api."+r.ns+".svc."+r.c.ClusterDomain+":8443", "--peer", r.id("api")),
		r.workloadPod("victim", "victim", "serve", "--peer", r.id("nobody")),
		r.pilotPod(),
	}
	for _, p := range pods {
		if _, err := r.kube.CoreV1().Pods(r.ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			r.t.Fatalf("pod %s: %v", p.Name, err)
		}
	}
	for _, p := range pods {
		podReady(r.t, r.kube, r.ns, p.Name)
		r.mark(fmt.Sprintf("pod %s/%s Ready", r.ns, p.Name))
	}
}

// checkBundle: meshid-ca keeps the root bundle ConfigMap in the new
// namespace, and it is meshid's root (the pods mounted it to start).
func (r *run) checkBundle() {
	cm, err := r.kube.CoreV1().ConfigMaps(r.ns).Get(context.Background(), bundleCM, metav1.GetOptions{})
	if err != nil {
		r.t.Fatalf("bundle ConfigMap in %s: %v", r.ns, err)
	}
	roots := parseCerts(r.t, cm.Data["root-cert.pem"])
	if len(roots) == 0 || !roots[0].IsCA {
		r.t.Fatalf("%s/%s holds no CA certificate", r.ns, bundleCM)
	}
}

func (r *run) roots() *x509.CertPool {
	cm, err := r.kube.CoreV1().ConfigMaps(r.ns).Get(context.Background(), bundleCM, metav1.GetOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range parseCerts(r.t, cm.Data["root-cert.pem"]) {
		pool.AddCert(c)
	}
	return pool
}

// rootSerials are the serials (hex) of the roots in the bundle ConfigMap.
func (r *run) rootSerials() map[string]bool {
	cm, err := r.kube.CoreV1().ConfigMaps(r.ns).Get(context.Background(), bundleCM, metav1.GetOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	out := map[string]bool{}
	for _, c := range parseCerts(r.t, cm.Data["root-cert.pem"]) {
		out[fmt.Sprintf("%x", c.SerialNumber)] = true
	}
	return out
}

func parseCerts(t *testing.T, pemText string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	rest := []byte(pemText)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return out
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
}

// checkPilotAgent: Istio's agent in the pod got its certificate from
// meshid-ca and serves it over its SDS socket (read with meshidctl secrets
// through kubectl exec).
func (r *run) checkPilotAgent() {
	type secretRow struct {
		ResourceName string `json:"resource_name"`
		Type         string `json:"type"`
		Status       string `json:"status"`
		ValidCert    bool   `json:"valid_cert"`
		SerialNumber string `json:"serial_number"`
		SPIFFEID     string `json:"spiffe_id"`
		KeyMatches   string `json:"key_matches"`
	}
	var report struct {
		Secrets []secretRow `json:"secrets"`
	}
	var rows []secretRow
	eventually(r.t, deadline, "pilot-agent serving its certificate over SDS", func() error {
		out, stderr, err := execIn(r.cfg, r.kube, r.ns, "pilot", "probe", "/usr/local/bin/meshidctl", "secrets",
			"--socket", "/var/run/secrets/workload-spiffe-uds/socket", "-o", "json")
		if err != nil {
			return fmt.Errorf("exec meshidctl secrets: %v: %s", err, stderr)
		}
		report.Secrets = nil
		if err := json.Unmarshal([]byte(out), &report); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		rows = report.Secrets
		for _, row := range rows {
			if row.ResourceName == "default" && row.ValidCert {
				return nil
			}
		}
		return fmt.Errorf("no valid default certificate: %s", out)
	})
	roots := r.rootSerials()
	for _, row := range rows {
		switch row.ResourceName {
		case "default":
			if row.SPIFFEID != r.id("pilot") || row.KeyMatches != "yes" {
				r.t.Errorf("pilot-agent serves %+v, want %s with its key", row, r.id("pilot"))
			}
			r.pilotSerial = row.SerialNumber
		case "ROOTCA":
			if !roots[row.SerialNumber] {
				r.t.Errorf("pilot-agent's ROOTCA %s is not meshid's root (%v)", row.SerialNumber, roots)
			}
		}
	}
	r.mark("pilot-agent (Istio's agent, in a pod) holds " + r.id("pilot") + " from meshid-ca, served over its SDS socket")
}

// attack deletes the victim pod, then runs a pod that tries to get the
// victim's identity over the agent's socket: without a token, with a token
// for another audience, with the deleted pod's token, with garbage, and by
// naming it over SDS. Only its own token may give it an identity: its own.
func (r *run) attack() time.Time {
	ctx := context.Background()
	victim, err := r.kube.CoreV1().Pods(r.ns).Get(ctx, "victim", metav1.GetOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	token, err := kubetest.PodToken(ctx, r.kube, r.ns, "victim", "victim", victim.UID, "istio-ca")
	if err != nil {
		r.t.Fatal(err)
	}
	if err := r.kube.CoreV1().Pods(r.ns).Delete(ctx, "victim", metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
		r.t.Fatal(err)
	}
	eventually(r.t, deadline, "victim pod gone", func() error {
		_, err := r.kube.CoreV1().Pods(r.ns).Get(ctx, "victim", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("still there (%v)", err)
	})
	deletedAt := time.Now()
	r.mark("victim pod deleted")
	if _, err := r.kube.CoreV1().Secrets(r.ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "stolen", Namespace: r.ns},
		StringData: map[string]string{"token": token},
	}, metav1.CreateOptions{}); err != nil {
		r.t.Fatal(err)
	}
	p := r.workloadPod("attacker", "attacker", "attack", "--victim-id", r.id("victim"), "--victim-token-file", "/stolen/token")
	p.Spec.Containers[0].ReadinessProbe = nil
	p.Spec.AutomountServiceAccountToken = ptr.To(true)
	p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "stolen", MountPath: "/stolen", ReadOnly: true})
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "stolen", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "stolen"}}})
	if _, err := r.kube.CoreV1().Pods(r.ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		r.t.Fatal(err)
	}
	var out string
	eventually(r.t, deadline, "the attacker's attempts", func() error {
		out, err = logs(r.kube, r.ns, "attacker", "workload")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "\ndone\n") && !strings.HasPrefix(out, "done\n") {
			pod, _ := r.kube.CoreV1().Pods(r.ns).Get(ctx, "attacker", metav1.GetOptions{})
			if pod != nil {
				return fmt.Errorf("not done: %q [%s]", out, podProblems(pod))
			}
			return fmt.Errorf("not done: %q", out)
		}
		return nil
	})
	want := map[string]string{ // attempt → the gRPC code it must get
		"no-token":                  "Unauthenticated",
		"api-server-audience-token": "Unauthenticated",
		"deleted-victim-token":      "Unauthenticated",
		"garbage-token":             "Unauthenticated",
		"sds-victim-name":           "InvalidArgument",
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var a struct{ Name, Code, Err, ID string }
		if err := json.Unmarshal([]byte(line), &a); err != nil {
			r.t.Fatalf("attacker output %q: %v", line, err)
		}
		seen[a.Name] = true
		if a.Name == "own-token" {
			// The control: the path works, and gives only its own name.
			if a.ID != r.id("attacker") {
				r.t.Errorf("attacker with its own token got %q (%s %s), want %s", a.ID, a.Code, a.Err, r.id("attacker"))
			}
			continue
		}
		if a.ID != "" || a.Code != want[a.Name] {
			r.t.Errorf("attacker %s: got identity %q, code %q (%s); want refused with %s", a.Name, a.ID, a.Code, a.Err, want[a.Name])
		}
	}
	for name := range want {
		if !seen[name] {
			r.t.Errorf("attacker did not report %s: %s", name, out)
		}
	}
	r.mark("attacker pod refused the victim's identity 5 ways (no token, foreign audience, deleted pod's token, garbage, by SDS name); its own token gave only its own")
	return deletedAt
}

// checkMTLSRotation: web and api, in two pods, talk mTLS through the agent,
// each checking the other's SPIFFE ID, until each has rotated at least once
// and a handshake has passed with both rotated certificates.
func (r *run) checkMTLSRotation() {
	ctx := context.Background()
	get := func(name string) *corev1.Pod {
		p, err := r.kube.CoreV1().Pods(r.ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			r.t.Fatal(err)
		}
		return p
	}
	web, api := get("web"), get("api")
	eventually(r.t, 2*certTTL, "web and api each rotated, then an mTLS handshake with the new certificates", func() error {
		ws, err := getStatus(web)
		if err != nil {
			return err
		}
		as, err := getStatus(api)
		if err != nil {
			return err
		}
		if len(ws.Certs) < 2 || len(as.Certs) < 2 {
			return fmt.Errorf("web holds its %d. certificate, api its %d.", len(ws.Certs), len(as.Certs))
		}
		// The client saw the server's current certificate, and the
		// server the client's.
		if !sawSerial(ws.PeerCerts, as.Certs[len(as.Certs)-1].Serial) || !sawSerial(as.PeerCerts, ws.Certs[len(ws.Certs)-1].Serial) {
			return fmt.Errorf("no handshake with both rotated certificates yet (web ok %d, last error %q)", ws.OK, ws.LastError)
		}
		for _, s := range []workloadStatus{ws, as} {
			if len(s.Lapses) > 0 {
				return fmt.Errorf("%s held an expired certificate at %v", s.ID, s.Lapses)
			}
		}
		for _, pc := range ws.PeerCerts {
			if pc.ID != r.id("api") {
				r.t.Errorf("web's peer was %s, want %s", pc.ID, r.id("api"))
			}
		}
		for _, pc := range as.PeerCerts {
			if pc.ID != r.id("web") {
				r.t.Errorf("api's peer was %s, want %s", pc.ID, r.id("web"))
			}
		}
		return nil
	})
	ws, _ := getStatus(web)
	r.mark(fmt.Sprintf("web ↔ api mTLS across rotations: web %d certificates, %d handshakes ok, %d failed", len(ws.Certs), ws.OK, ws.Failed))
}

func sawSerial(certs []certSeen, serial string) bool {
	for _, c := range certs {
		if c.Serial == serial {
			return true
		}
	}
	return false
}

// meshidctl runs the host's meshidctl against meshid-ca's admin API
// through a port-forward, as the README tells operators.
func (r *run) meshidctl(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(build.dir, "meshidctl"), append(args, r.ctlConn...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// checkMeshidctl: through kubectl port-forward to a meshid-ca pod, with the
// admin service account's token, meshidctl lists the workloads' identities
// and its health check passes, the agent's socket included.
func (r *run) checkMeshidctl() {
	ctx := context.Background()
	r.connectMeshidctl()
	dir := r.t.TempDir()
	web, err := r.kube.CoreV1().Pods(r.ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	webToken, err := kubetest.PodToken(ctx, r.kube, r.ns, "web", "web", web.UID, "istio-ca")
	if err != nil {
		r.t.Fatal(err)
	}
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			r.t.Fatal(err)
		}
		return p
	}
	out, err := r.meshidctl("identities", "-n", r.ns, "-o", "json")
	if err != nil {
		r.t.Fatalf("meshidctl identities: %v: %s", err, out)
	}
	var ids []struct {
		SPIFFEID          string `json:"spiffe_id"`
		ValidCertificates int    `json:"valid_certificates"`
	}
	if err := json.Unmarshal([]byte(out), &ids); err != nil {
		r.t.Fatalf("meshidctl identities: %v: %s", err, out)
	}
	got := map[string]int{}
	for _, id := range ids {
		got[id.SPIFFEID] = id.ValidCertificates
	}
	for _, sa := range []string{"api", "web", "victim", "attacker", "pilot"} {
		if got[r.id(sa)] == 0 {
			r.t.Errorf("meshidctl identities -n %s: %s has no valid certificate: %s", r.ns, r.id(sa), out)
		}
	}
	out, err = r.meshidctl("check", "--agent-socket", "/run/meshid/socket", "--agent-token-file", write("web.token", webToken))
	if err != nil {
		r.t.Errorf("meshidctl check: %v:\n%s", err, out)
	} else {
		r.t.Logf("meshidctl check:\n%s", out)
	}
	r.mark("meshidctl through port-forward: identities of the namespace listed, check passed (CA, ledger, bundle, the node's agent)")
}

// connectMeshidctl port-forwards to a Ready meshid-ca pod's admin port and
// sets meshidctl's flags: that address, meshid's root from the bundle
// ConfigMap, and a token of the admin service account.
func (r *run) connectMeshidctl() {
	ctx := context.Background()
	pods, err := r.kube.CoreV1().Pods(caNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=meshid-ca"})
	if err != nil {
		r.t.Fatal(err)
	}
	var pod string
	for _, p := range pods.Items {
		if ready(&p) && p.DeletionTimestamp == nil {
			pod = p.Name
			break
		}
	}
	if pod == "" {
		r.t.Fatalf("no Ready meshid-ca pod: %s", r.podsState(caNS))
	}
	addr := portForward(r.t, r.cfg, caNS, pod, 15013)
	admin, err := r.kube.CoreV1().ServiceAccounts(caNS).CreateToken(ctx, "meshid-admin", &authnTokenRequest, metav1.CreateOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	cm, err := r.kube.CoreV1().ConfigMaps(caNS).Get(ctx, bundleCM, metav1.GetOptions{})
	if err != nil {
		r.t.Fatal(err)
	}
	dir := r.t.TempDir()
	root, token := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "admin.token")
	if err := os.WriteFile(root, []byte(cm.Data["root-cert.pem"]), 0o600); err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(token, []byte(admin.Status.Token), 0o600); err != nil {
		r.t.Fatal(err)
	}
	r.ctlConn = []string{"--server", addr, "--ca-file", root, "--token-file", token}
}

// killLeader crashes the elected meshid-ca as a lost node would: SIGKILL
// to its process on the node (no Lease released), and its pod deleted at
// once (no restart under the same name). Another replica must take the
// Lease when it expires, and no workload may hold an expired certificate
// while renewals go on.
func (r *run) killLeader() {
	ctx := context.Background()
	lease, err := r.kube.CoordinationV1().Leases(caNS).Get(ctx, "meshid-ca-leader", metav1.GetOptions{})
	if err != nil || lease.Spec.HolderIdentity == nil {
		r.t.Fatalf("meshid-ca's Lease: %v", err)
	}
	leader := *lease.Spec.HolderIdentity
	pod, err := r.kube.CoreV1().Pods(caNS).Get(ctx, leader, metav1.GetOptions{})
	if err != nil {
		r.t.Fatalf("the leader %q: %v", leader, err)
	}
	var killed int
	for _, p := range processes("meshid-ca") {
		if p.inPod(string(pod.UID)) {
			if err := syscallKill(p.pid); err != nil {
				r.t.Fatal(err)
			}
			killed++
		}
	}
	if killed != 1 {
		r.t.Fatalf("%d meshid-ca processes of the leader %s found", killed, leader)
	}
	if err := r.kube.CoreV1().Pods(caNS).Delete(ctx, leader, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
		r.t.Fatal(err)
	}
	killedAt := time.Now()
	r.mark("SIGKILL to the leader " + leader + ", its pod deleted")
	var newLeader string
	eventually(r.t, deadline, "another replica holding the Lease", func() error {
		l, err := r.kube.CoordinationV1().Leases(caNS).Get(ctx, "meshid-ca-leader", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if h := ptr.Deref(l.Spec.HolderIdentity, ""); h != "" && h != leader {
			newLeader = h
			return nil
		}
		return fmt.Errorf("held by %q", ptr.Deref(l.Spec.HolderIdentity, ""))
	})
	if p, err := r.kube.CoreV1().Pods(caNS).Get(ctx, newLeader, metav1.GetOptions{}); err != nil || p.DeletionTimestamp != nil {
		r.t.Errorf("the new leader %s is no live pod: %v", newLeader, err)
	}
	survivor := "the surviving replica"
	if pod, err := r.kube.CoreV1().Pods(caNS).Get(ctx, newLeader, metav1.GetOptions{}); err == nil && pod.CreationTimestamp.After(killedAt.Add(-time.Second)) {
		survivor = "the replacement pod"
	}
	r.mark(fmt.Sprintf("the Lease taken by %s (%s), %.1fs after the kill", newLeader, survivor, time.Since(killedAt).Seconds()))
	web, _ := r.kube.CoreV1().Pods(r.ns).Get(ctx, "web", metav1.GetOptions{})
	api, _ := r.kube.CoreV1().Pods(r.ns).Get(ctx, "api", metav1.GetOptions{})
	before, _ := getStatus(web)
	failedBefore := map[string]int{}
	for _, p := range []*corev1.Pod{web, api} {
		s, _ := getStatus(p)
		failedBefore[p.Name] = s.Failed
	}
	eventually(r.t, 2*certTTL, "web and api renewed after the kill, with no lapse", func() error {
		for _, p := range []*corev1.Pod{web, api} {
			s, err := getStatus(p)
			if err != nil {
				return err
			}
			if len(s.Lapses) > 0 {
				r.t.Fatalf("%s held an expired certificate at %v", s.ID, s.Lapses)
			}
			if last := s.Certs[len(s.Certs)-1]; !last.Seen.After(killedAt) {
				return fmt.Errorf("%s has no certificate issued since the kill", s.ID)
			}
		}
		return nil
	})
	after, _ := getStatus(web)
	if after.OK <= before.OK {
		r.t.Errorf("web's handshakes stopped after the kill: %d ok before, %d after", before.OK, after.OK)
	}
	// The workloads' mTLS does not go through the CA: no handshake may
	// fail while it fails over.
	for _, p := range []*corev1.Pod{web, api} {
		if s, _ := getStatus(p); s.Failed != failedBefore[p.Name] {
			r.t.Errorf("%s: %d handshakes failed during the failover: %v", p.Name, s.Failed-failedBefore[p.Name], s.Errors)
		}
	}
	// The killed replica comes back (the kubelet restarts it).
	eventually(r.t, deadline, "meshid-ca 2/2 Ready again", func() error {
		d, err := r.kube.AppsV1().Deployments(caNS).Get(ctx, "meshid-ca", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.Status.ReadyReplicas != 2 {
			return fmt.Errorf("%d/2", d.Status.ReadyReplicas)
		}
		return nil
	})
	r.mark(fmt.Sprintf("web and api renewed after the kill, no certificate lapsed; web's handshakes %d → %d; meshid-ca 2/2 again", before.OK, after.OK))
	// meshidctl's port-forward may have gone with the killed pod.
	r.connectMeshidctl()
}

// checkDeletedNotRenewed: nothing was issued to the deleted victim after
// it was gone, although its certificate's renewal time has long passed.
func (r *run) checkDeletedNotRenewed(deletedAt time.Time) {
	if wait := time.Until(deletedAt.Add(certTTL)); wait > 0 {
		// Past the victim's renewal time (half a lifetime) and its
		// certificate's expiry: whatever renewal could happen has had
		// its chance.
		eventually(r.t, wait+time.Minute, "the victim's last certificate expiring", func() error {
			if time.Now().Before(deletedAt.Add(certTTL)) {
				return fmt.Errorf("%s left", time.Until(deletedAt.Add(certTTL)).Round(time.Second))
			}
			return nil
		})
	}
	out, err := r.meshidctl("certs", "--spiffe-id", r.id("victim"), "--all", "-o", "json")
	if err != nil {
		r.t.Fatalf("meshidctl certs: %v: %s", err, out)
	}
	var certs []struct {
		Serial   string    `json:"serial"`
		IssuedAt time.Time `json:"issued_at"`
		PodName  string    `json:"pod_name"`
	}
	if err := json.Unmarshal([]byte(out), &certs); err != nil {
		r.t.Fatal(err)
	}
	if len(certs) == 0 {
		r.t.Fatalf("the ledger has no certificate of the victim: %s", out)
	}
	for _, c := range certs {
		if c.IssuedAt.After(deletedAt) {
			r.t.Errorf("certificate %s issued to %s at %s, after the pod was deleted at %s", c.Serial, r.id("victim"), c.IssuedAt, deletedAt)
		}
	}
	r.mark(fmt.Sprintf("deleted victim: %d certificates in the ledger, none issued after its deletion", len(certs)))
}

// checkLedgerHoldsEverything: every certificate web and api ever held is
// in the ledger, for their identity and pod.
func (r *run) checkLedgerHoldsEverything() {
	n := 0
	for _, name := range []string{"web", "api"} {
		p, err := r.kube.CoreV1().Pods(r.ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			r.t.Fatal(err)
		}
		s, err := getStatus(p)
		if err != nil {
			r.t.Fatal(err)
		}
		for _, c := range s.Certs {
			out, err := r.meshidctl("certs", "--serial", c.Serial, "-o", "json")
			if err != nil {
				r.t.Errorf("%s's certificate %s is not in the ledger: %v: %s", name, c.Serial, err, out)
				continue
			}
			if !strings.Contains(out, r.id(name)) || !strings.Contains(out, `"pod_name": "`+name+`"`) {
				r.t.Errorf("the ledger's record of %s: %s", c.Serial, out)
			}
			n++
		}
	}
	if out, err := r.meshidctl("certs", "--serial", r.pilotSerial, "-o", "json"); err != nil || !strings.Contains(out, r.id("pilot")) || !strings.Contains(out, `"pod_name": "pilot"`) {
		r.t.Errorf("pilot-agent's certificate %s in the ledger: %v: %s", r.pilotSerial, err, out)
	}
	r.mark(fmt.Sprintf("all %d certificates web and api held, and pilot-agent's, are in the ledger", n))
}

// report logs the Ready timeline and the memory of every component.
func (r *run) report() {
	sort.Slice(r.events, func(i, j int) bool { return r.events[i].at.Before(r.events[j].at) })
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "T+\tevent")
	for _, e := range r.events {
		fmt.Fprintf(tw, "%.1fs\t%s\n", e.at.Sub(r.begin).Seconds(), e.what)
	}
	tw.Flush()
	b.WriteString("\nmemory (RSS) per process on the node:\n")
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "process\tpid\tRSS MiB")
	for _, p := range processes("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "coredns", "containerd", "postgres",
		"meshid-ca", "meshid-agent", "pilot-agent", "workload") {
		fmt.Fprintf(tw, "%s\t%d\t%.1f\n", filepath.Base(p.argv0), p.pid, float64(p.rssKiB)/1024)
	}
	tw.Flush()
	r.t.Logf("timeline and memory:\n%s", b.String())
	if f := os.Getenv("MESHID_CLUSTER_REPORT"); f != "" {
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
			r.t.Error(err)
		}
	}
}

func intOrString(name string) intstr.IntOrString { return intstr.FromString(name) }

// authnTokenRequest asks for a token meshid-ca accepts (audience istio-ca).
var authnTokenRequest = authenticationv1.TokenRequest{
	Spec: authenticationv1.TokenRequestSpec{Audiences: []string{"istio-ca"}, ExpirationSeconds: ptr.To[int64](3600)},
}

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGKILL) }
