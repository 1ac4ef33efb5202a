package sds_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/internal/satoken"
	"github.com/meshid/meshid/sds"
)

// nodeFixture is one agent serving every proxy of a node: each stream is
// authenticated by its own token, checked offline against the issuer's keys.
type nodeFixture struct {
	ca       *catest.CA
	answered atomic.Int64 // when the CA last answered, Unix nanoseconds
	issuer   *satoken.Issuer
	manager  *agent.Manager
	client   secretv3.SecretDiscoveryServiceClient
}

func startNode(t testing.TB) *nodeFixture {
	t.Helper()
	issuer, err := satoken.New("https://node-test.local")
	if err != nil {
		t.Fatal(err)
	}
	jwksPath := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(jwksPath, issuer.JWKS(), 0o644); err != nil {
		t.Fatal(err)
	}
	keys := k8sauth.NewFileKeySet(jwksPath)
	if err := keys.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	auth := &k8sauth.JWKS{Issuer: issuer.URL, Audiences: []string{"istio-ca"}, Keys: keys}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	c := catest.New(t)
	// The CA checks the token it is given, as meshid-ca does.
	c.Identify = func(token string) (spiffeid.ID, error) {
		caller, err := auth.Authenticate(context.Background(), token)
		if err != nil {
			return spiffeid.ID{}, err
		}
		return spiffeid.FromSegments(td, "ns", caller.Namespace, "sa", caller.ServiceAccount)
	}
	f := &nodeFixture{ca: c, issuer: issuer}
	m, err := agent.NewManager(agent.Config{Signer: timedSigner{c, &f.answered}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	f.manager = m
	srv := sds.New(agent.Node{Manager: m, Auth: auth, TrustDomain: td}, agent.NewBundle(td, []*x509.Certificate{c.Root()}), nil)
	_, conn := serveSDS(t, srv, "socket", 0o660)
	f.client = secretv3.NewSecretDiscoveryServiceClient(conn)
	return f
}

// timedSigner notes when the CA answers.
type timedSigner struct {
	agent.Signer
	answered *atomic.Int64
}

func (s timedSigner) Sign(ctx context.Context, csrPEM []byte, token string, ttl time.Duration) ([]*x509.Certificate, error) {
	chain, err := s.Signer.Sign(ctx, csrPEM, token, ttl)
	s.answered.Store(time.Now().UnixNano())
	return chain, err
}

func (f *nodeFixture) caAnswered() time.Time { return time.Unix(0, f.answered.Load()) }

func (f *nodeFixture) token(t testing.TB, ns, sa string, ttl time.Duration) string {
	t.Helper()
	tok, err := f.issuer.Token(satoken.Claims{Namespace: ns, ServiceAccount: sa, Audiences: []string{"istio-ca"}, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// stream opens a "default" stream with token (none if empty) and returns
// the first answer or the error that ended the stream.
func (f *nodeFixture) stream(t testing.TB, token string) (*discoveryv3.DiscoveryResponse, grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse], error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	s, err := f.client.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType}); err != nil {
		t.Fatal(err)
	}
	resp, err := s.Recv()
	return resp, s, err
}

func TestNodeModeIsolation(t *testing.T) {
	f := startNode(t)
	webID := "spiffe://cluster.local/ns/shop/sa/web"
	apiID := "spiffe://cluster.local/ns/billing/sa/api"

	respA, _, err := f.stream(t, f.token(t, "shop", "web", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if got := workloadLeafID(t, respA); got != webID {
		t.Fatalf("stream with web's token got %s", got)
	}
	respB, _, err := f.stream(t, f.token(t, "billing", "api", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if got := workloadLeafID(t, respB); got != apiID {
		t.Fatalf("stream with api's token got %s", got)
	}
	// A second proxy of web shares web's certificate: no new CA request.
	calls := f.ca.Calls()
	respA2, _, err := f.stream(t, f.token(t, "shop", "web", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if workloadLeafID(t, respA2) != webID || respA2.VersionInfo != respA.VersionInfo || f.ca.Calls() != calls {
		t.Errorf("second proxy of web: version %s (first %s), %d new CA calls", respA2.VersionInfo, respA.VersionInfo, f.ca.Calls()-calls)
	}

	for name, token := range map[string]string{
		"no token":                "",
		"garbage token":           "not-a-jwt",
		"token of another issuer": otherIssuerToken(t),
	} {
		resp, _, err := f.stream(t, token)
		if status.Code(err) != codes.Unauthenticated || resp != nil {
			t.Errorf("%s: got %v, err %v; want nothing and Unauthenticated", name, resp, err)
		}
	}
}

func otherIssuerToken(t *testing.T) string {
	is, err := satoken.New("https://node-test.local") // same URL, other key
	if err != nil {
		t.Fatal(err)
	}
	tok, err := is.Token(satoken.Claims{Namespace: "shop", ServiceAccount: "web", Audiences: []string{"istio-ca"}})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestNodeModeForgetsAndClosesOnExpiry(t *testing.T) {
	f := startNode(t)
	_, s, err := f.stream(t, f.token(t, "shop", "web", 2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if ids := f.manager.Identities(); len(ids) != 1 {
		t.Fatalf("identities held: %v", ids)
	}
	// The token lives 2s: the stream is then closed for the proxy to come
	// back with a fresh token, and the identity no stream uses is forgotten.
	// gRPC answers a stream its server ends while the handler reads with
	// Canceled; the proxy reconnects whatever the code.
	_, err = s.Recv()
	if status.Code(err) != codes.Canceled {
		t.Fatalf("stream after token expiry: %v, want it closed (Canceled)", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(f.manager.Identities()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("identity still held after its only stream ended: %v", f.manager.Identities())
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
}

func workloadLeafID(t *testing.T, resp *discoveryv3.DiscoveryResponse) string {
	t.Helper()
	secs := secrets(t, resp)
	if len(secs) != 1 {
		t.Fatalf("%d secrets", len(secs))
	}
	chain := secs[0].GetTlsCertificate().GetCertificateChain().GetInlineBytes()
	certs, err := ca.ParseCertificatesPEM(chain)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0].URIs[0].String()
}
