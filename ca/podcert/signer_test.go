package podcert_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	certsv1beta1 "k8s.io/api/certificates/v1beta1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/admin"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/podcert"
	"github.com/meshid/meshid/ca/server"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/poll"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// noTokens is the CA service's authenticator, which the signer never
// calls: pod certificates carry no token.
type noTokens struct{}

func (noTokens) Authenticate(context.Context, string) (k8sauth.Caller, error) {
	return k8sauth.Caller{}, errors.New("not used")
}

type env struct {
	c      *kubetest.Cluster
	roots  []*x509.Certificate
	ledger *ledger.Ledger
	denied *admin.DenyList
	node   *corev1.Node
}

func start(t *testing.T) *env {
	t.Helper()
	c := kubetest.Start(t, kubetest.PodCertificates)
	ctx := context.Background()
	if _, err := c.Client.CertificatesV1beta1().PodCertificateRequests("default").List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("the test kube-apiserver serves no certificates.k8s.io/v1beta1 PodCertificateRequests (Kubernetes 1.35 or newer, hack/kube-assets.sh): %v", err)
	}
	m, err := keys.Generate(keys.Options{TrustDomain: td.Name()})
	if err != nil {
		t.Fatal(err)
	}
	is, err := m.Issuer(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var src keys.Source
	src.Set(is)
	authority, err := ca.New(ca.Config{Issuers: &src, MaxTTL: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{c: c, roots: is.Roots(), denied: &admin.DenyList{}}
	e.ledger, err = ledger.Open(ctx, ledger.Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "ledger.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.ledger.Close() })
	svc, err := server.NewCertificateService(server.Config{
		Authority: authority, Auth: noTokens{}, TrustDomain: td, Ledger: e.ledger, DenyList: e.denied,
		Metrics: server.NewMetrics(prometheus.NewRegistry(), &src),
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 2)
	signer := &podcert.Signer{Client: c.Client, Issuer: svc, MaxTTL: 48 * time.Hour, Backdate: ca.DefaultBackdate}
	bundle := &podcert.TrustBundle{Client: c.Client, Roots: func() []*x509.Certificate { return e.roots }, Poll: 100 * time.Millisecond}
	go func() { done <- signer.Run(runCtx) }()
	go func() { done <- bundle.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	})
	c.Node(t, "node-1")
	e.node, err = c.Client.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// request files a PodCertificateRequest for pod as its kubelet would, with
// key and edit applied to it before it is created.
func (e *env) request(t *testing.T, name string, pod *corev1.Pod, key crypto.Signer, edit func(*certsv1beta1.PodCertificateRequestSpec)) (*certsv1beta1.PodCertificateRequest, error) {
	t.Helper()
	ctx := context.Background()
	sa, err := e.c.Client.CoreV1().ServiceAccounts(pod.Namespace).Get(ctx, pod.Spec.ServiceAccountName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pkix, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	spec := certsv1beta1.PodCertificateRequestSpec{
		SignerName: podcert.DefaultSignerName,
		PodName:    pod.Name, PodUID: pod.UID,
		ServiceAccountName: sa.Name, ServiceAccountUID: sa.UID,
		NodeName: types.NodeName(e.node.Name), NodeUID: e.node.UID,
		MaxExpirationSeconds: ptr(int32(86400)),
		PKIXPublicKey:        pkix,
	}
	if edit != nil {
		edit(&spec)
	}
	spec.ProofOfPossession = prove(t, key, string(spec.PodUID))
	if edit != nil {
		edit(&spec) // again, for edits of the proof itself
	}
	return e.c.Client.CertificatesV1beta1().PodCertificateRequests(pod.Namespace).Create(ctx, &certsv1beta1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: pod.Namespace}, Spec: spec,
	}, metav1.CreateOptions{})
}

// stub turns a spec into what a kubelet of 1.37 files: a stub PKCS #10
// request signed by key in place of the key and its proof.
func stub(t *testing.T, key crypto.Signer) func(*certsv1beta1.PodCertificateRequestSpec) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return func(s *certsv1beta1.PodCertificateRequestSpec) {
		s.PKIXPublicKey, s.ProofOfPossession, s.StubPKCS10Request = nil, nil, der
	}
}

func prove(t *testing.T, key crypto.Signer, podUID string) []byte {
	t.Helper()
	if _, ok := key.(ed25519.PrivateKey); ok {
		sig, err := key.Sign(rand.Reader, []byte(podUID), crypto.Hash(0))
		if err != nil {
			t.Fatal(err)
		}
		return sig
	}
	digest := sha256.Sum256([]byte(podUID))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

func ptr[T any](v T) *T { return &v }

// answer waits for the signer's answer to ns/name.
func (e *env) answer(t *testing.T, ns, name string) *certsv1beta1.PodCertificateRequest {
	t.Helper()
	var pcr *certsv1beta1.PodCertificateRequest
	poll.Until(t, "the answer to "+ns+"/"+name, func() bool {
		var err error
		pcr, err = e.c.Client.CertificatesV1beta1().PodCertificateRequests(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return len(pcr.Status.Conditions) > 0
	})
	return pcr
}

func condition(pcr *certsv1beta1.PodCertificateRequest) (string, string) {
	c := pcr.Status.Conditions[0]
	return c.Type, c.Reason
}

func newKey(t *testing.T, curve elliptic.Curve) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(curve, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSignerIssues(t *testing.T) {
	e := start(t)
	pod := e.c.Pod(t, "shop", "web-0", "web", "node-1")
	key := newKey(t, elliptic.P256())
	if _, err := e.request(t, "web-0-1", pod, key, nil); err != nil {
		t.Fatal(err)
	}
	pcr := e.answer(t, "shop", "web-0-1")
	if typ, reason := condition(pcr); typ != certsv1beta1.PodCertificateRequestConditionTypeIssued {
		t.Fatalf("answer %s (%s): %s", typ, reason, pcr.Status.Conditions[0].Message)
	}
	chain, err := ca.ParseCertificatesPEM([]byte(pcr.Status.CertificateChain))
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, e.roots))
	if err != nil || id.String() != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Fatalf("the chain: %v, %v", id, err)
	}
	if !chain[0].PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Error("issued to another key")
	}

	// As a kubelet of 1.37 asks: a stub PKCS #10 request.
	pod1 := e.c.Pod(t, "shop", "web-1", "web", "node-1")
	key1 := newKey(t, elliptic.P384())
	if _, err := e.request(t, "web-1-1", pod1, key1, stub(t, key1)); err != nil {
		t.Fatal(err)
	}
	if pcr1 := e.answer(t, "shop", "web-1-1"); pcr1.Status.Conditions[0].Type != certsv1beta1.PodCertificateRequestConditionTypeIssued {
		t.Errorf("a stub PKCS #10 request: %s (%s): %s", pcr1.Status.Conditions[0].Type, pcr1.Status.Conditions[0].Reason, pcr1.Status.Conditions[0].Message)
	} else if c1, err := ca.ParseCertificatesPEM([]byte(pcr1.Status.CertificateChain)); err != nil || !c1[0].PublicKey.(*ecdsa.PublicKey).Equal(key1.Public()) {
		t.Errorf("a stub PKCS #10 request: issued to another key (%v)", err)
	}
	st := pcr.Status
	lifetime := st.NotAfter.Sub(st.NotBefore.Time)
	if lifetime != 24*time.Hour || !st.NotBefore.Time.Equal(chain[0].NotBefore) || st.BeginRefreshAt.Sub(st.NotBefore.Time) != 12*time.Hour {
		t.Errorf("notBefore %v, notAfter %v, beginRefreshAt %v: want a 24h certificate (maxExpirationSeconds) refreshed at half", st.NotBefore, st.NotAfter, st.BeginRefreshAt)
	}
	page, err := e.ledger.Certificates(context.Background(), ledger.Filter{SPIFFEID: id.String(), PodName: "web-0"})
	if err != nil {
		t.Fatal(err)
	}
	certs := page.Records
	if len(certs) != 1 || certs[0].PodUID != string(pod.UID) || certs[0].AuthMethod != string(server.MethodPodCertificate) {
		t.Errorf("ledger: %+v; want one record for the pod", certs)
	}

	// The roots are in the signer's ClusterTrustBundle.
	var ctb *certsv1beta1.ClusterTrustBundle
	poll.Until(t, "the signer's ClusterTrustBundle", func() bool {
		ctb, err = e.c.Client.CertificatesV1beta1().ClusterTrustBundles().Get(context.Background(), podcert.TrustBundleName(podcert.DefaultSignerName), metav1.GetOptions{})
		return err == nil
	})
	got, _ := ca.ParseCertificatesPEM([]byte(ctb.Spec.TrustBundle))
	if ctb.Spec.SignerName != podcert.DefaultSignerName || len(got) != 1 || !got[0].Equal(e.roots[0]) {
		t.Errorf("ClusterTrustBundle %s: signer %q, %d roots", ctb.Name, ctb.Spec.SignerName, len(got))
	}
}

func TestSignerRefuses(t *testing.T) {
	e := start(t)
	web := e.c.Pod(t, "shop", "web-0", "web", "node-1")
	other := e.c.Pod(t, "shop", "api-0", "api", "node-1")
	e.denied.Deny(ledger.Denial{SPIFFEID: "spiffe://cluster.local/ns/shop/sa/banned", Reason: "test", At: time.Now()})
	banned := e.c.Pod(t, "shop", "banned-0", "banned", "node-1")
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p521, p256 := newKey(t, elliptic.P521()), newKey(t, elliptic.P256())
	for _, tc := range []struct {
		name      string
		pod       *corev1.Pod
		key       crypto.Signer
		edit      func(*certsv1beta1.PodCertificateRequestSpec)
		condition string
		reason    string
	}{
		{"another pod's UID", web, newKey(t, elliptic.P256()), func(s *certsv1beta1.PodCertificateRequestSpec) { s.PodUID = other.UID }, "Denied", podcert.ReasonPodMismatch},
		{"a pod that does not exist", web, newKey(t, elliptic.P256()), func(s *certsv1beta1.PodCertificateRequestSpec) { s.PodName = "gone-0" }, "Denied", podcert.ReasonPodMismatch},
		{"another service account", web, newKey(t, elliptic.P256()), func(s *certsv1beta1.PodCertificateRequestSpec) {
			s.ServiceAccountName = "api"
			sa, _ := e.c.Client.CoreV1().ServiceAccounts("shop").Get(context.Background(), "api", metav1.GetOptions{})
			s.ServiceAccountUID = sa.UID
		}, "Denied", podcert.ReasonPodMismatch},
		{"a wrong node UID", web, newKey(t, elliptic.P256()), func(s *certsv1beta1.PodCertificateRequestSpec) { s.NodeUID = "not-the-node" }, "Denied", podcert.ReasonPodMismatch},
		{"an Ed25519 key", web, edKey, nil, "Denied", podcert.ReasonUnsupportedKeyType},
		{"a P-521 key", web, newKey(t, elliptic.P521()), nil, "Denied", podcert.ReasonUnsupportedKeyType},
		{"a denied identity", banned, newKey(t, elliptic.P256()), nil, "Denied", podcert.ReasonIdentityDenied},
		{"an Ed25519 stub request", web, edKey, stub(t, edKey), "Denied", podcert.ReasonUnsupportedKeyType},
		{"a P-521 stub request", web, p521, stub(t, p521), "Denied", podcert.ReasonUnsupportedKeyType},
		{"another pod UID in a stub request", web, p256, func(s *certsv1beta1.PodCertificateRequestSpec) { stub(t, p256)(s); s.PodUID = other.UID }, "Denied", podcert.ReasonPodMismatch},
		{"user annotations", web, p256, func(s *certsv1beta1.PodCertificateRequestSpec) {
			s.UnverifiedUserAnnotations = map[string]string{"example.com/role": "admin"}
		}, "Denied", podcert.ReasonUserConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.ReplaceAll(strings.ReplaceAll(tc.name, " ", "-"), "'", "")
			name = strings.ToLower(name)
			if _, err := e.request(t, name, tc.pod, tc.key, tc.edit); err != nil {
				t.Fatal(err)
			}
			pcr := e.answer(t, tc.pod.Namespace, name)
			if typ, reason := condition(pcr); typ != tc.condition || reason != tc.reason {
				t.Errorf("%s (%s): %s; want %s (%s)", typ, reason, pcr.Status.Conditions[0].Message, tc.condition, tc.reason)
			}
			if pcr.Status.CertificateChain != "" {
				t.Error("a refused request holds a certificate")
			}
		})
	}

	// What the API server itself refuses never reaches the signer.
	for name, edit := range map[string]func(*certsv1beta1.PodCertificateRequestSpec){
		"bad-proof":     func(s *certsv1beta1.PodCertificateRequestSpec) { s.ProofOfPossession = []byte("not a signature") },
		"too-long":      func(s *certsv1beta1.PodCertificateRequestSpec) { s.MaxExpirationSeconds = ptr(int32(100 * 24 * 3600)) },
		"rsa-2048":      nil,
		"no-public-key": func(s *certsv1beta1.PodCertificateRequestSpec) { s.PKIXPublicKey = nil },
	} {
		key := newKey(t, elliptic.P256())
		if name == "rsa-2048" {
			key = rsaKey(t, 2048)
		}
		if _, err := e.request(t, name, web, key, edit); err == nil {
			t.Errorf("%s: the API server took it", name)
		}
	}
	page, err := e.ledger.Certificates(context.Background(), ledger.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Records) != 0 {
		t.Errorf("%d certificates issued for refused requests", len(page.Records))
	}
}

func TestRefreshAt(t *testing.T) {
	nb := time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct{ lifetime, want time.Duration }{
		{24 * time.Hour, 12 * time.Hour},
		{time.Hour, 30 * time.Minute},
		{25 * time.Minute, 12*time.Minute + 30*time.Second},
	} {
		got := podcert.RefreshAt(nb, nb.Add(tc.lifetime), 0).Sub(nb)
		if got != tc.want && tc.lifetime >= 20*time.Minute {
			t.Errorf("%v: refresh after %v, want %v", tc.lifetime, got, tc.want)
		}
		if got < 10*time.Minute || got > tc.lifetime-10*time.Minute {
			t.Errorf("%v: refresh after %v, outside the API's bounds", tc.lifetime, got)
		}
	}
	if got := podcert.RefreshAt(nb, nb.Add(time.Hour), 0.01).Sub(nb); got != 10*time.Minute {
		t.Errorf("1%% of an hour: refresh after %v, want the API's earliest, 10m", got)
	}
}

func FuzzCheckCSR(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	f.Add(der)
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		pub, err := podcert.CheckCSR(der)
		if err == nil && pub == nil {
			t.Fatal("no key and no error")
		}
	})
}

func FuzzCheckKey(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pkix, _ := x509.MarshalPKIXPublicKey(k.Public())
	digest := sha256.Sum256([]byte("uid-1"))
	sig, _ := ecdsa.SignASN1(rand.Reader, k, digest[:])
	f.Add(pkix, sig, "uid-1")
	f.Add([]byte{0x30, 0x03}, []byte{}, "")
	f.Fuzz(func(t *testing.T, pkix, proof []byte, uid string) {
		pub, err := podcert.CheckKey(pkix, proof, uid)
		if err == nil && pub == nil {
			t.Fatal("no key and no error")
		}
	})
}

func rsaKey(t *testing.T, bits int) crypto.Signer {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
