// Package kubetest starts a real kube-apiserver and etcd (controller-runtime's
// envtest) for tests, and mints service-account tokens with TokenRequest.
//
// The binaries come from KUBEBUILDER_ASSETS, or from the cache that
// hack/kube-assets.sh fills. When neither has them the test is skipped with
// the command that builds them, unless MESHID_REQUIRE_KUBE=1 (set by
// `make test` and CI), which turns the skip into a failure.
package kubetest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// kubeVersion is the Kubernetes version hack/kube-assets.sh builds.
const kubeVersion = "v1.37.2"

// Cluster is a running control plane with an admin client.
type Cluster struct {
	Config     *rest.Config
	Client     kubernetes.Interface
	Kubeconfig string // a kubeconfig file with the admin credentials

	env *envtest.Environment
}

// Assets returns the directory holding kube-apiserver and etcd, or "" when
// none is found.
func Assets() string {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir
	}
	cache := CacheDir()
	if cache == "" {
		return ""
	}
	dir := filepath.Join(cache, "kube-assets", kubeVersion)
	for _, bin := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, bin)); err != nil {
			return ""
		}
	}
	return dir
}

// CacheDir is where the hack/ scripts cache the real parts they build:
// $MESHID_CACHE_DIR, else $XDG_CACHE_HOME/meshid, else ~/.cache/meshid.
func CacheDir() string {
	if dir := os.Getenv("MESHID_CACHE_DIR"); dir != "" {
		return dir
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "meshid")
}

// RequireAssets skips (or, with MESHID_REQUIRE_KUBE=1, fails) t when no
// control-plane binaries are available, and skips it under -short.
func RequireAssets(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no kube-apiserver")
	}
	dir := Assets()
	if dir == "" {
		msg := "no kube-apiserver/etcd: set KUBEBUILDER_ASSETS or run hack/kube-assets.sh (make test does)"
		if os.Getenv("MESHID_REQUIRE_KUBE") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return dir
}

// Start runs a fresh control plane for t and stops it when t ends.
// apiserverFlags are extra kube-apiserver flags, name to value (without
// the dashes): feature-gates, runtime-config.
func Start(t testing.TB, apiserverFlags ...map[string]string) *Cluster {
	t.Helper()
	c, err := start(RequireAssets(t), t.TempDir(), apiserverFlags...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Stop() })
	return c
}

// PodCertificates are the kube-apiserver flags that serve Pod
// Certificates and ClusterTrustBundles (beta, off by default).
var PodCertificates = map[string]string{
	"feature-gates":  "PodCertificateRequest=true,ClusterTrustBundle=true",
	"runtime-config": "certificates.k8s.io/v1beta1=true",
}

func start(assets, dir string, apiserverFlags ...map[string]string) (*Cluster, error) {
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	args := env.ControlPlane.GetAPIServer().Configure().
		// The default would pick a host interface; loopback works everywhere.
		Set("advertise-address", "127.0.0.1").
		// Silences a harmless error about the loopback Endpoints.
		Set("endpoint-reconciler-type", "none")
	for _, flags := range apiserverFlags {
		for k, v := range flags {
			args.Set(k, v)
		}
	}
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("kubetest: starting kube-apiserver and etcd from %s: %w", assets, err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		env.Stop()
		return nil, fmt.Errorf("kubetest: %w", err)
	}
	c := &Cluster{Config: cfg, Client: client, env: env, Kubeconfig: filepath.Join(dir, "kubeconfig")}
	if err := writeKubeconfig(cfg, c.Kubeconfig); err != nil {
		env.Stop()
		return nil, err
	}
	return c, nil
}

// ServiceAccountSigningKeyFile is the PEM private key the API server signs
// service-account tokens with, for tests that must forge a token only one
// claim away from a valid one (an expired one, say).
func (c *Cluster) ServiceAccountSigningKeyFile() string {
	return filepath.Join(c.env.ControlPlane.APIServer.CertDir, "sa-signer.key")
}

// KillAPIServer kills kube-apiserver with SIGKILL, as a crash or a lost
// node would, and waits until it is gone; etcd keeps running. (A graceful
// stop can take envtest's whole 20 s stop timeout while clients hold
// watches open.)
func (c *Cluster) KillAPIServer(t testing.TB) {
	t.Helper()
	pid := ChildPID("kube-apiserver")
	if pid == 0 {
		t.Fatal("kubetest: no kube-apiserver child process")
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kubetest: killing kube-apiserver: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		// Gone, or a zombie envtest has not reaped yet: either way it
		// serves nothing.
		if err != nil || strings.Contains(string(b[strings.LastIndexByte(string(b), ')')+1:]), " Z ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("kubetest: kube-apiserver still running 30s after SIGKILL")
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
}

// ChildPID finds a child of this process running the program named comm
// (envtest starts kube-apiserver and etcd); 0 if there is none.
func ChildPID(comm string) int {
	ents, _ := os.ReadDir("/proc")
	me := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(b)
		open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || end < open || s[open+1:end] != comm {
			continue
		}
		f := strings.Fields(s[end+2:])
		if ppid, _ := strconv.Atoi(f[1]); ppid == me {
			return pid
		}
	}
	return 0
}

// Stop stops the control plane; calling it twice is harmless.
func (c *Cluster) Stop() error {
	if c.env == nil {
		return nil
	}
	env := c.env
	c.env = nil
	return env.Stop()
}

func writeKubeconfig(cfg *rest.Config, path string) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{
		Server:                   cfg.Host,
		CertificateAuthorityData: cfg.CAData,
	}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: cfg.CertData,
		ClientKeyData:         cfg.KeyData,
		Token:                 cfg.BearerToken,
	}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "admin"}
	kc.CurrentContext = "envtest"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return fmt.Errorf("kubetest: writing kubeconfig: %w", err)
	}
	return nil
}

// ServiceAccount creates namespace ns (if needed) and service account sa in it.
func (c *Cluster) ServiceAccount(t testing.TB, ns, sa string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("creating namespace %s: %v", ns, err)
	}
	_, err = c.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("creating service account %s/%s: %v", ns, sa, err)
	}
}

// Token asks the API server for a token of ns/sa with the given audiences
// (none: the API server's default audience).
func (c *Cluster) Token(t testing.TB, ns, sa string, audiences ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	expiry := int64(3600)
	tr, err := c.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: &expiry},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// KubeconfigFor writes a kubeconfig that acts as service account ns/sa (a
// token for the API server's own audience), so a process run with it has
// exactly the RBAC that account was granted.
func (c *Cluster) KubeconfigFor(t testing.TB, ns, sa string) string {
	t.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: c.Config.Host, CertificateAuthorityData: c.Config.CAData}
	kc.AuthInfos[sa] = &clientcmdapi.AuthInfo{Token: c.Token(t, ns, sa)}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: sa, Namespace: ns}
	kc.CurrentContext = "envtest"
	path := filepath.Join(t.TempDir(), ns+"-"+sa+".kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		t.Fatalf("kubetest: writing kubeconfig: %v", err)
	}
	return path
}

// Node creates a Node object named name. No kubelet runs it: pods with
// spec.nodeName set to it are accepted and stay Pending.
func (c *Cluster) Node(t testing.TB, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("creating node %s: %v", name, err)
	}
}

// Pod creates pod ns/name running as service account sa (created too, with
// its namespace, if needed) on node ("" for none), and returns it.
func (c *Cluster) Pod(t testing.TB, ns, name, sa, node string) *corev1.Pod {
	t.Helper()
	c.ServiceAccount(t, ns, sa)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := c.Client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa,
			NodeName:           node,
			Containers:         []corev1.Container{{Name: "app", Image: "app"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", ns, name, err)
	}
	return p
}

// DeletePod deletes pod ns/name at once (no kubelet holds it).
func (c *Cluster) DeletePod(t testing.TB, ns, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	zero := int64(0)
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		t.Fatalf("deleting pod %s/%s: %v", ns, name, err)
	}
}

// PodToken asks the API server for a token of pod's service account bound
// to pod, as a projected token volume holds, with the given audiences.
func (c *Cluster) PodToken(t testing.TB, pod *corev1.Pod, audiences ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tok, err := PodToken(ctx, c.Client, pod.Namespace, pod.Spec.ServiceAccountName, pod.Name, pod.UID, audiences...)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// PodToken is Cluster.PodToken for callers without a testing.TB (many
// goroutines at once): a one-hour token of ns/sa bound to pod name, uid.
func PodToken(ctx context.Context, client kubernetes.Interface, ns, sa, name string, uid types.UID, audiences ...string) (string, error) {
	expiry := int64(3600)
	tr, err := client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			Audiences:         audiences,
			ExpirationSeconds: &expiry,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: name, UID: uid},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("TokenRequest for pod %s/%s: %w", ns, name, err)
	}
	return tr.Status.Token, nil
}
