package server

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/admin"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/internal/satoken"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	webID = spiffeid.RequireFromPath(td, "/ns/demo/sa/web")
)

// env is a CA served over real gRPC + TLS on loopback.
type env struct {
	issuers  *keys.Source
	material *keys.Material
	tokens   *satoken.Issuer
	metrics  *Metrics
	reg      *prometheus.Registry
	client   pb.IstioCertificateServiceClient
	conn     *grpc.ClientConn
	addr     string
	logs     *lockedBuffer
	ledger   *ledger.Ledger
	denied   *admin.DenyList
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type envOptions struct {
	auth        k8sauth.Authenticator // nil: JWKS against env.tokens
	rateLimit   rate.Limit
	rateBurst   int
	nsLimit     Limit
	globalLimit Limit
	noIssuer    bool
	ledger      Recorder // nil: a SQLite ledger in a temporary directory
	nodeProxies NodeProxies
	jwt         JWTSigner // nil: MintJWTSVID not served
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	is, err := m.Issuer(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{issuers: &keys.Source{}, material: m, reg: prometheus.NewRegistry(), logs: &lockedBuffer{}}
	if !o.noIssuer {
		e.issuers.Set(is)
	}
	e.tokens, err = satoken.New("https://issuer.test")
	if err != nil {
		t.Fatal(err)
	}
	authn := o.auth
	if authn == nil {
		jwks := filepath.Join(t.TempDir(), "jwks.json")
		os.WriteFile(jwks, e.tokens.JWKS(), 0o644)
		authn = &k8sauth.JWKS{Issuer: e.tokens.URL, Audiences: []string{"istio-ca"}, Keys: k8sauth.NewFileKeySet(jwks)}
	}
	e.metrics = NewMetrics(e.reg, e.issuers)
	e.ledger, err = ledger.Open(context.Background(), ledger.Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "ledger.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.ledger.Close() })
	rec := o.ledger
	if rec == nil {
		rec = e.ledger
	}
	e.denied = &admin.DenyList{}
	authority, err := ca.New(ca.Config{Issuers: e.issuers})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewCertificateService(Config{
		Authority: authority, Auth: authn, TrustDomain: td,
		Limits: Limits{Pod: Limit{Rate: o.rateLimit, Burst: o.rateBurst}, Namespace: o.nsLimit, Global: o.globalLimit},
		Ledger: rec, DenyList: e.denied, NodeProxies: o.nodeProxies,
		Metrics: e.metrics, Log: slog.New(slog.NewJSONHandler(e.logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	// The serving certificate needs an issuer even when the test has none
	// loaded for signing workloads.
	servingAuthority, _ := ca.New(ca.Config{Issuers: fixedIssuer{is}})
	serving := &ServingCertificate{Authority: servingAuthority, Issuers: fixedIssuer{is}, DNSNames: []string{"localhost", "istiod.istio-system.svc", "127.0.0.1", "::1"}}
	srv, hs := NewGRPCServer(svc, TLSConfig(serving), 0)
	if o.jwt != nil {
		svc.JWT(o.jwt).Register(srv)
	}
	SetServing(hs, true)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	e.addr = lis.Addr().String()
	e.conn, err = agent.DialCA(e.addr, func() []*x509.Certificate { return []*x509.Certificate{m.RootCert} }, "istiod.istio-system.svc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.conn.Close() })
	e.client = pb.NewIstioCertificateServiceClient(e.conn)
	return e
}

type fixedIssuer struct{ is *ca.Issuer }

func (f fixedIssuer) Issuer() *ca.Issuer { return f.is }

func (e *env) token(t testing.TB, ns, sa string, aud ...string) string {
	t.Helper()
	if aud == nil {
		aud = []string{"istio-ca"}
	}
	tok, err := e.tokens.Token(satoken.Claims{Namespace: ns, ServiceAccount: sa, PodName: sa + "-0", PodUID: ns + "-" + sa + "-0", Audiences: aud})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (e *env) call(token string, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	return e.client.CreateCertificate(ctx, req)
}

func (e *env) issued() int {
	return int(testutil.ToFloat64(e.metrics.requests.WithLabelValues(codes.OK.String())))
}

var (
	keyOnce sync.Once
	ecKey   *ecdsa.PrivateKey
)

func testKey() crypto.Signer {
	keyOnce.Do(func() { ecKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader) })
	return ecKey
}

func csrFor(t testing.TB, key crypto.Signer, edit func(*x509.CertificateRequest)) string {
	t.Helper()
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{Organization: []string{""}}, URIs: []*url.URL{webID.URL()}}
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func TestCreateCertificate(t *testing.T) {
	e := newEnv(t, envOptions{})
	resp, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil), ValidityDuration: 3600})
	if err != nil {
		t.Fatal(err)
	}
	chain, err := agent.ParseChain(resp.CertChain)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 || !chain[2].Equal(e.material.RootCert) {
		t.Fatalf("chain of %d, want leaf, intermediate, root (root last)", len(chain))
	}
	id, _, err := x509svid.Verify(chain[:2], x509bundle.FromX509Authorities(td, e.material.Roots))
	if err != nil || id != webID {
		t.Fatalf("x509svid.Verify = %v, %v", id, err)
	}
	if got := chain[0].NotAfter.Sub(time.Now()); got < 59*time.Minute || got > time.Hour {
		t.Errorf("lifetime left %s, want about 1h", got)
	}

	// One log line per issuance, with what an operator needs and no secret.
	logs := e.logs.String()
	if !strings.Contains(logs, `"msg":"certificate issued"`) || !strings.Contains(logs, `"spiffe_id":"spiffe://cluster.local/ns/demo/sa/web"`) ||
		!strings.Contains(logs, `"pod":"demo/web-0"`) || !strings.Contains(logs, `"serial":"`) || !strings.Contains(logs, `"not_after":"`) {
		t.Errorf("issuance log line lacks fields: %s", logs)
	}
	assertNoSecrets(t, logs)
}

// assertNoSecrets fails when a log holds anything shaped like a token, a CSR
// or a key.
func assertNoSecrets(t *testing.T, logs string) {
	t.Helper()
	for _, bad := range []string{"eyJ", "BEGIN", "PRIVATE"} {
		if strings.Contains(logs, bad) {
			t.Errorf("log contains %q: %s", bad, logs)
		}
	}
}

func TestCreateCertificateTTL(t *testing.T) {
	e := newEnv(t, envOptions{})
	tok := e.token(t, "demo", "web")
	for _, tc := range []struct {
		name    string
		seconds int64
		want    time.Duration
		code    codes.Code
	}{
		{name: "zero asks for the default", seconds: 0, want: time.Hour},
		{name: "istio-agent's 86400", seconds: 86400, want: 24 * time.Hour},
		{name: "huge is clamped", seconds: 1 << 62, want: 24 * time.Hour},
		{name: "short", seconds: 5, want: 5 * time.Second},
		{name: "negative", seconds: -1, code: codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := e.issued()
			start := time.Now().Truncate(time.Second)
			resp, err := e.call(tok, &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil), ValidityDuration: tc.seconds})
			if tc.code != codes.OK {
				if status.Code(err) != tc.code || status.Convert(err).Message() != msgNegativeTTL {
					t.Fatalf("err = %v, want %s %q", err, tc.code, msgNegativeTTL)
				}
				if e.issued() != before {
					t.Fatal("a refused request was counted as issued")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			chain, _ := agent.ParseChain(resp.CertChain)
			got := chain[0].NotAfter.Sub(start)
			if got < tc.want || got > tc.want+2*time.Second {
				t.Errorf("lifetime %s, want %s", got, tc.want)
			}
		})
	}
}

func TestCreateCertificateRefusals(t *testing.T) {
	e := newEnv(t, envOptions{})
	tok := e.token(t, "demo", "web")
	good := csrFor(t, testKey(), nil)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	block, _ := pem.Decode([]byte(good))
	badSig := append([]byte(nil), block.Bytes...)
	badSig[len(badSig)-1] ^= 0xff
	uri := func(s string) func(*x509.CertificateRequest) {
		return func(r *x509.CertificateRequest) { u, _ := url.Parse(s); r.URIs = []*url.URL{u} }
	}
	otherAud := e.token(t, "demo", "web", "https://kubernetes.default.svc")
	nsA := e.token(t, "team-a", "web")

	for _, tc := range []struct {
		name  string
		token string
		req   *pb.IstioCertificateRequest
		code  codes.Code
		msg   string
	}{
		{name: "no token", req: &pb.IstioCertificateRequest{Csr: good}, code: codes.Unauthenticated, msg: msgNoToken},
		{name: "garbage token", token: "garbage", req: &pb.IstioCertificateRequest{Csr: good}, code: codes.Unauthenticated, msg: msgAuthFailed},
		{name: "token for another audience", token: otherAud, req: &pb.IstioCertificateRequest{Csr: good}, code: codes.Unauthenticated, msg: msgAuthFailed},
		{name: "namespace A token, CSR for namespace B", token: nsA, req: &pb.IstioCertificateRequest{Csr: good}, code: codes.PermissionDenied, msg: "csr names an identity other than the caller's"},
		{name: "not PEM", token: tok, req: &pb.IstioCertificateRequest{Csr: "hello"}, code: codes.InvalidArgument, msg: "invalid csr: not PEM"},
		{name: "empty CSR", token: tok, req: &pb.IstioCertificateRequest{}, code: codes.InvalidArgument, msg: "invalid csr: not PEM"},
		{name: "not a CSR", token: tok, req: &pb.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{0x30, 0x03, 0x02, 0x01, 0x01}}))}, code: codes.InvalidArgument, msg: "invalid csr: malformed request"},
		{name: "bad signature", token: tok, req: &pb.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: badSig}))}, code: codes.InvalidArgument, msg: "invalid csr: bad signature"},
		{name: "DNS name", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), func(r *x509.CertificateRequest) { r.DNSNames = []string{"web"} })}, code: codes.InvalidArgument, msg: "invalid csr: DNS names are not allowed"},
		{name: "IP address", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), func(r *x509.CertificateRequest) { r.IPAddresses = []net.IP{net.IPv6loopback} })}, code: codes.InvalidArgument, msg: "invalid csr: IP addresses are not allowed"},
		{name: "email", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), func(r *x509.CertificateRequest) { r.EmailAddresses = []string{"a@b.c"} })}, code: codes.InvalidArgument, msg: "invalid csr: email addresses are not allowed"},
		{name: "common name", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), func(r *x509.CertificateRequest) { r.Subject.CommonName = "web" })}, code: codes.InvalidArgument, msg: "invalid csr: a subject common name is not allowed"},
		{name: "extra URI", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), func(r *x509.CertificateRequest) {
			u, _ := url.Parse("spiffe://cluster.local/ns/demo/sa/admin")
			r.URIs = append(r.URIs, u)
		})}, code: codes.InvalidArgument, msg: "invalid csr: exactly one URI SAN is required"},
		{name: "another trust domain", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), uri("spiffe://other.example/ns/demo/sa/web"))}, code: codes.PermissionDenied, msg: "csr names an identity other than the caller's"},
		{name: "another namespace", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), uri("spiffe://cluster.local/ns/kube-system/sa/web"))}, code: codes.PermissionDenied, msg: "csr names an identity other than the caller's"},
		{name: "RSA under 2048", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, rsa1024, nil)}, code: codes.InvalidArgument, msg: "invalid csr: RSA key must be 2048, 3072 or 4096 bits"},
		{name: "unsupported curve", token: tok, req: &pb.IstioCertificateRequest{Csr: csrFor(t, p521, nil)}, code: codes.InvalidArgument, msg: "invalid csr: ECDSA key must be on P-256 or P-384"},
		{name: "CSR over 8 KiB", token: tok, req: &pb.IstioCertificateRequest{Csr: good + strings.Repeat("\n", 9000)}, code: codes.InvalidArgument, msg: "invalid csr: too large"},
		{name: "message over the gRPC limit", token: tok, req: &pb.IstioCertificateRequest{Csr: good + strings.Repeat("x", 100<<10)}, code: codes.ResourceExhausted},
		{name: "impersonation", token: tok, req: &pb.IstioCertificateRequest{Csr: good, Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{"ImpersonatedIdentity": structpb.NewStringValue("spiffe://cluster.local/ns/x/sa/y")}}}, code: codes.PermissionDenied, msg: msgImpersonation},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := e.issued()
			resp, err := e.call(tc.token, tc.req)
			if status.Code(err) != tc.code {
				t.Fatalf("code = %v (%v), want %v", status.Code(err), err, tc.code)
			}
			if tc.msg != "" && status.Convert(err).Message() != tc.msg {
				t.Errorf("message = %q, want %q", status.Convert(err).Message(), tc.msg)
			}
			if resp != nil || e.issued() != before {
				t.Error("something was issued")
			}
		})
	}
	assertNoSecrets(t, e.logs.String())
}

func TestCreateCertificateRateLimit(t *testing.T) {
	e := newEnv(t, envOptions{rateLimit: rate.Every(time.Hour), rateBurst: 2})
	tok := e.token(t, "demo", "web")
	req := &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)}
	for i := range 2 {
		if _, err := e.call(tok, req); err != nil {
			t.Fatalf("request %d within the burst: %v", i, err)
		}
	}
	_, err := e.call(tok, req)
	if status.Code(err) != codes.ResourceExhausted || status.Convert(err).Message() != msgRateLimited {
		t.Fatalf("third request: %v, want ResourceExhausted", err)
	}
	// Another identity has its own bucket.
	other := e.token(t, "demo", "api")
	csr := csrFor(t, testKey(), func(r *x509.CertificateRequest) {
		r.URIs = []*url.URL{spiffeid.RequireFromPath(td, "/ns/demo/sa/api").URL()}
	})
	if _, err := e.call(other, &pb.IstioCertificateRequest{Csr: csr}); err != nil {
		t.Fatalf("another identity was limited: %v", err)
	}
}

// The limit counts per pod: the replicas of one Deployment, sharing a
// service account, do not wait for each other; tokens bound to no pod share
// their identity's bucket.
func TestCreateCertificateRateLimitPerPod(t *testing.T) {
	e := newEnv(t, envOptions{rateLimit: rate.Every(time.Hour), rateBurst: 1})
	req := &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)}
	podToken := func(pod string) string {
		tok, err := e.tokens.Token(satoken.Claims{Namespace: "demo", ServiceAccount: "web", PodName: pod, PodUID: "uid-" + pod, Audiences: []string{"istio-ca"}})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	for i := range 50 {
		if _, err := e.call(podToken(fmt.Sprint("web-", i)), req); err != nil {
			t.Fatalf("pod %d of one service account: %v", i, err)
		}
	}
	if _, err := e.call(podToken("web-7"), req); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a pod over its own limit: %v, want ResourceExhausted", err)
	}
	unbound := func() string {
		tok, err := e.tokens.Token(satoken.Claims{Namespace: "demo", ServiceAccount: "web", Audiences: []string{"istio-ca"}})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	if _, err := e.call(unbound(), req); err != nil {
		t.Fatalf("first token bound to no pod: %v", err)
	}
	if _, err := e.call(unbound(), req); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("second token bound to no pod, same identity: %v, want ResourceExhausted", err)
	}
}

func TestCreateCertificateFailsClosed(t *testing.T) {
	t.Run("authentication unavailable", func(t *testing.T) {
		e := newEnv(t, envOptions{auth: reviewerDown(t)})
		_, err := e.call("some.token.value", &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
		if status.Code(err) != codes.Unavailable || status.Convert(err).Message() != msgAuthUnavailable {
			t.Fatalf("err = %v, want Unavailable %q", err, msgAuthUnavailable)
		}
		if e.issued() != 0 {
			t.Fatal("issued while authentication was unavailable")
		}
	})
	t.Run("no CA loaded", func(t *testing.T) {
		e := newEnv(t, envOptions{noIssuer: true})
		_, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
		if status.Code(err) != codes.Unavailable || status.Convert(err).Message() != msgNotReady {
			t.Fatalf("err = %v, want Unavailable %q", err, msgNotReady)
		}
	})
}

// reviewerDown is a TokenReview authenticator whose API server cannot be
// reached: a real client pointed at a closed port.
func reviewerDown(t *testing.T) k8sauth.Authenticator {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://" + addr, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return &k8sauth.TokenReview{Client: client.AuthenticationV1(), Audiences: []string{"istio-ca"}}
}

func TestHealthAndHTTP(t *testing.T) {
	e := newEnv(t, envOptions{})
	resp, err := healthpb.NewHealthClient(e.conn).Check(context.Background(), &healthpb.HealthCheckRequest{Service: pb.IstioCertificateService_ServiceDesc.ServiceName})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC health = %v, %v", resp, err)
	}
	e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
	e.call("garbage", &pb.IstioCertificateRequest{Csr: "x"})

	var ready error = errors.New("CA keys not loaded")
	h := NewHTTPHandler(e.reg, func() error { return ready })
	get := func(path string) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		body, _ := io.ReadAll(rec.Result().Body)
		return rec.Code, string(body)
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d", code)
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "CA keys not loaded") {
		t.Errorf("/readyz before keys = %d %q", code, body)
	}
	ready = nil
	if code, _ := get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after keys = %d", code)
	}
	code, body := get("/metrics")
	for _, want := range []string{
		`meshid_ca_requests_total{code="OK"} 1`,
		`meshid_ca_requests_total{code="Unauthenticated"} 1`,
		`meshid_ca_auth_failures_total{reason="malformed"} 1`,
		`meshid_ca_issuance_duration_seconds_count 1`,
		`meshid_ca_cert_expiry_timestamp_seconds{cert="root"}`,
		`meshid_ca_cert_expiry_timestamp_seconds{cert="intermediate"}`,
	} {
		if code != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

func TestServingCertificate(t *testing.T) {
	m1, _ := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
	is1, _ := m1.Issuer(time.Now())
	src := &keys.Source{}
	src.Set(is1)
	authority, _ := ca.New(ca.Config{Issuers: src})
	s := &ServingCertificate{Authority: authority, Issuers: src, DNSNames: []string{"istiod.istio-system.svc"}}
	c1, err := s.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	if c2, _ := s.Certificate(); c2 != c1 {
		t.Error("renewed a certificate that is not due")
	}
	if len(c1.Certificate) != 2 {
		t.Errorf("serving chain has %d certificates, want leaf and intermediate", len(c1.Certificate))
	}
	pool := x509.NewCertPool()
	pool.AddCert(m1.RootCert)
	inter := x509.NewCertPool()
	inter.AddCert(m1.CACert)
	if _, err := c1.Leaf.Verify(x509.VerifyOptions{DNSName: "istiod.istio-system.svc", Roots: pool, Intermediates: inter}); err != nil {
		t.Errorf("serving certificate does not verify for istiod.istio-system.svc: %v", err)
	}

	// A new CA (plug-in reload): the next handshake gets a certificate
	// from it.
	m2, _ := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
	is2, _ := m2.Issuer(time.Now())
	src.Set(is2)
	c3, err := s.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	if c3 == c1 || string(c3.Leaf.AuthorityKeyId) != string(m2.CACert.SubjectKeyId) {
		t.Error("serving certificate not renewed under the new CA")
	}
}

// A client on the same machine may dial the CA by address: 127.0.0.1 is
// verified against the serving certificate's IP SANs, no name mapping
// needed; a name the certificate does not carry is refused with the names
// it does.
func TestServingCertificateLoopbackAddress(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, port, _ := net.SplitHostPort(e.addr)
	roots := func() []*x509.Certificate { return []*x509.Certificate{e.material.RootCert} }
	conn, err := agent.DialCA(net.JoinHostPort("127.0.0.1", port), roots, "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(callCtx(t, e.token(t, "demo", "web")),
		&pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)}); err != nil {
		t.Fatalf("dialing 127.0.0.1: %v", err)
	}

	wrong, err := agent.DialCA(e.addr, roots, "ca.example.com")
	if err != nil {
		t.Fatal(err)
	}
	defer wrong.Close()
	_, err = pb.NewIstioCertificateServiceClient(wrong).CreateCertificate(callCtx(t, e.token(t, "demo", "web")),
		&pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
	if err == nil || !strings.Contains(err.Error(), "ca.example.com") || !strings.Contains(err.Error(), "it names localhost, istiod.istio-system.svc, 127.0.0.1, ::1: dial one of those") {
		t.Errorf("a name the certificate lacks: %v, want the names it carries", err)
	}
}

func callCtx(t *testing.T, token string) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// Metadata is bounded: a request with more than MaxHeaderListBytes of
// headers is refused before it reaches the service (grpc-go would take
// 16 MiB), and nothing is issued.
func TestHeaderListBounded(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx := callCtx(t, e.token(t, "demo", "web"))
	ctx = metadata.AppendToOutgoingContext(ctx, "x-padding", strings.Repeat("a", MaxHeaderListBytes))
	_, err := e.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
	if err == nil {
		t.Fatal("a request with 64 KiB of headers was served")
	}
	if e.issued() != 0 {
		t.Error("issued on an oversized request")
	}
	// The connection still serves requests of a sane size.
	if _, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)}); err != nil {
		t.Fatalf("a normal request after the oversized one: %v", err)
	}
}

// Namespace and CA-wide buckets bound what many pods together can take (a
// namespace's editor can make pods, each with its own bucket); a request
// one scope refuses takes nothing from the others.
func TestCreateCertificateRateLimitScopes(t *testing.T) {
	podToken := func(e *env, ns, pod string) string {
		tok, err := e.tokens.Token(satoken.Claims{Namespace: ns, ServiceAccount: "web", PodName: pod, PodUID: ns + "-" + pod, Audiences: []string{"istio-ca"}})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	reqFor := func(ns string) *pb.IstioCertificateRequest {
		return &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), func(r *x509.CertificateRequest) {
			r.URIs = []*url.URL{spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/web").URL()}
		})}
	}
	limited := func(err error, msg string) bool {
		return status.Code(err) == codes.ResourceExhausted && status.Convert(err).Message() == msg
	}

	t.Run("namespace", func(t *testing.T) {
		e := newEnv(t, envOptions{rateLimit: rate.Every(time.Hour), rateBurst: 1, nsLimit: Limit{Rate: rate.Every(time.Hour), Burst: 2}})
		if _, err := e.call(podToken(e, "demo", "a"), reqFor("demo")); err != nil {
			t.Fatal(err)
		}
		// Pod a is over its own bucket: refused, and the namespace's token
		// it did not use stays for pod b.
		if _, err := e.call(podToken(e, "demo", "a"), reqFor("demo")); !limited(err, msgRateLimited) {
			t.Fatalf("pod a again: %v, want its own limit", err)
		}
		if _, err := e.call(podToken(e, "demo", "b"), reqFor("demo")); err != nil {
			t.Fatalf("pod b: %v", err)
		}
		if _, err := e.call(podToken(e, "demo", "c"), reqFor("demo")); !limited(err, msgNamespaceLimit) {
			t.Fatalf("pod c, namespace spent: %v, want the namespace limit", err)
		}
		if _, err := e.call(podToken(e, "other", "c"), reqFor("other")); err != nil {
			t.Fatalf("another namespace: %v", err)
		}
		if got := testutil.ToFloat64(e.metrics.rateLimited.WithLabelValues(scopeNamespace)); got != 1 {
			t.Errorf("meshid_ca_rate_limited_total{scope=namespace} = %v, want 1", got)
		}
	})
	t.Run("global", func(t *testing.T) {
		e := newEnv(t, envOptions{globalLimit: Limit{Rate: rate.Every(time.Hour), Burst: 2}})
		for i, ns := range []string{"a", "b"} {
			if _, err := e.call(podToken(e, ns, "p"), reqFor(ns)); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		}
		if _, err := e.call(podToken(e, "c", "p"), reqFor("c")); !limited(err, msgGlobalLimit) {
			t.Fatalf("third request, CA-wide bucket spent: %v", err)
		}
		if e.issued() != 2 {
			t.Errorf("%d issued, want 2", e.issued())
		}
	})
}
