package sds_test

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/sds"
)

var web = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")

type fixture struct {
	ca      *catest.CA
	manager *agent.Manager
	bundle  *agent.Bundle
	client  secretv3.SecretDiscoveryServiceClient
	server  *sds.Server
	socket  string
}

// start serves SDS over a Unix socket for a pod whose certificates live ttl.
func start(t testing.TB, ttl time.Duration, configure ...func(*agent.Config)) *fixture {
	t.Helper()
	c := catest.New(t)
	cfg := agent.Config{Signer: c, TTL: ttl, Backoff: agent.Backoff{Initial: 100 * time.Millisecond, Max: time.Second}}
	for _, f := range configure {
		f(&cfg)
	}
	m, err := agent.NewManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	bundle := agent.NewBundle(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{c.Root()})
	srv := sds.New(agent.Pod{Manager: m, ID: web, Tokens: agent.StaticToken(web.String())}, bundle, nil)
	socket, conn := serveSDS(t, srv, "workload-spiffe-uds/socket", 0o600)
	return &fixture{ca: c, manager: m, bundle: bundle, client: secretv3.NewSecretDiscoveryServiceClient(conn), server: srv, socket: socket}
}

// serveSDS serves srv on a Unix socket at name under a short temporary
// directory (socket paths are limited to 108 bytes) and dials it.
func serveSDS(t testing.TB, srv *sds.Server, name string, mode os.FileMode) (string, *grpc.ClientConn) {
	t.Helper()
	dir, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, name)
	lis, err := sds.Listen(socket, mode)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(sds.ServerOptions()...)
	srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return socket, conn
}

// envoyStream is one SDS stream as Envoy drives it: one resource name, the
// node on the first request only, ACK or NACK by nonce.
type envoyStream struct {
	t      *testing.T
	stream grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	name   string
	resps  chan *discoveryv3.DiscoveryResponse
	errs   chan error
}

func (f *fixture) open(t *testing.T, name string) *envoyStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := f.client.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s := &envoyStream{t: t, stream: stream, name: name, resps: make(chan *discoveryv3.DiscoveryResponse, 16), errs: make(chan error, 1)}
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				s.errs <- err
				return
			}
			s.resps <- resp
		}
	}()
	s.send(&discoveryv3.DiscoveryRequest{
		Node:          &corev3.Node{Id: "sidecar~10.0.0.1~web-7d4b9.shop~shop.svc.cluster.local", Cluster: "web.shop"},
		ResourceNames: []string{name},
		TypeUrl:       sds.SecretType,
	})
	return s
}

func (s *envoyStream) send(req *discoveryv3.DiscoveryRequest) {
	s.t.Helper()
	if err := s.stream.Send(req); err != nil {
		s.t.Fatal(err)
	}
}

func (s *envoyStream) ack(resp *discoveryv3.DiscoveryResponse) {
	s.send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: []string{s.name}, TypeUrl: sds.SecretType})
}

func (s *envoyStream) nack(resp *discoveryv3.DiscoveryResponse, previous string) {
	s.send(&discoveryv3.DiscoveryRequest{VersionInfo: previous, ResponseNonce: resp.Nonce, ResourceNames: []string{s.name}, TypeUrl: sds.SecretType,
		ErrorDetail: &statuspb.Status{Code: int32(codes.InvalidArgument), Message: "rejected by test"}})
}

// next waits for a response; it fails the test after within.
func (s *envoyStream) next(within time.Duration) *discoveryv3.DiscoveryResponse {
	s.t.Helper()
	select {
	case resp := <-s.resps:
		if resp.Nonce == "" || resp.VersionInfo == "" || resp.TypeUrl != sds.SecretType {
			s.t.Fatalf("response without nonce, version or type: %v", resp)
		}
		return resp
	case err := <-s.errs:
		s.t.Fatalf("stream ended: %v", err)
	case <-time.After(within):
		s.t.Fatalf("no response within %s", within)
	}
	return nil
}

// quiet checks that nothing arrives for a while (used only to show that an
// ACK or NACK is not answered; a response would arrive in microseconds).
func (s *envoyStream) quiet(d time.Duration) {
	s.t.Helper()
	select {
	case resp := <-s.resps:
		s.t.Fatalf("unexpected response %s", resp.VersionInfo)
	case err := <-s.errs:
		s.t.Fatalf("stream ended: %v", err)
	case <-time.After(d):
	}
}

func secrets(t *testing.T, resp *discoveryv3.DiscoveryResponse) []*tlsv3.Secret {
	t.Helper()
	var out []*tlsv3.Secret
	for _, a := range resp.Resources {
		var sec tlsv3.Secret
		if err := a.UnmarshalTo(&sec); err != nil {
			t.Fatal(err)
		}
		if err := sec.Validate(); err != nil {
			t.Fatalf("secret %s fails Validate: %v", sec.Name, err)
		}
		out = append(out, &sec)
	}
	return out
}

// workloadLeaf checks a "default" secret and returns its leaf.
func workloadLeaf(t *testing.T, sec *tlsv3.Secret) *x509.Certificate {
	t.Helper()
	tc := sec.GetTlsCertificate()
	if sec.Name != sds.WorkloadCertName || tc == nil {
		t.Fatalf("secret %s is not a TLS certificate", sec.Name)
	}
	pair, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		t.Fatalf("chain and key do not match: %v", err)
	}
	if len(pair.Leaf.URIs) != 1 || pair.Leaf.URIs[0].String() != web.String() {
		t.Fatalf("leaf names %v", pair.Leaf.URIs)
	}
	if _, ok := pair.PrivateKey.(crypto.Signer); !ok {
		t.Fatal("key is not a signer")
	}
	return pair.Leaf
}

func TestStreamDefaultPushesRotation(t *testing.T) {
	f := start(t, 2*time.Second)
	s := f.open(t, sds.WorkloadCertName)
	first := s.next(10 * time.Second)
	secs := secrets(t, first)
	if len(secs) != 1 {
		t.Fatalf("%d resources, want 1", len(secs))
	}
	leaf1 := workloadLeaf(t, secs[0])
	s.ack(first)
	if got := f.server.OpenStreams(); got != 1 {
		t.Errorf("OpenStreams %d, want 1", got)
	}
	// The certificate lives 2s and is renewed at about half life: the new
	// one is pushed without any request.
	second := s.next(10 * time.Second)
	leaf2 := workloadLeaf(t, secrets(t, second)[0])
	if leaf2.SerialNumber.Cmp(leaf1.SerialNumber) == 0 || second.VersionInfo == first.VersionInfo || second.Nonce == first.Nonce {
		t.Fatalf("rotation pushed the same certificate (version %s, nonce %s)", second.VersionInfo, second.Nonce)
	}
	s.ack(second)
}

func TestStreamRootCAPushesBundleChange(t *testing.T) {
	f := start(t, time.Hour)
	s := f.open(t, sds.RootCertName)
	first := s.next(10 * time.Second)
	vc := secrets(t, first)[0].GetValidationContext()
	roots, err := ca.ParseCertificatesPEM(vc.GetTrustedCa().GetInlineBytes())
	if err != nil || len(roots) != 1 || !roots[0].Equal(f.ca.Root()) {
		t.Fatalf("ROOTCA holds %d certificates (%v), want the CA's root", len(roots), err)
	}
	s.ack(first)
	s.quiet(200 * time.Millisecond)

	// A root rotation: the bundle holds old and new; every stream gets it at once.
	next := catest.New(t).Root()
	f.bundle.Set([]*x509.Certificate{f.ca.Root(), next})
	second := s.next(5 * time.Second)
	roots, _ = ca.ParseCertificatesPEM(secrets(t, second)[0].GetValidationContext().GetTrustedCa().GetInlineBytes())
	if len(roots) != 2 {
		t.Fatalf("after the bundle change ROOTCA holds %d roots, want 2", len(roots))
	}
}

func TestStreamNACKIsNotResent(t *testing.T) {
	f := start(t, time.Hour)
	s := f.open(t, sds.RootCertName)
	first := s.next(10 * time.Second)
	s.nack(first, "")
	s.quiet(200 * time.Millisecond)
	// A stale nonce is ignored too.
	s.send(&discoveryv3.DiscoveryRequest{ResponseNonce: "stale", ResourceNames: []string{sds.RootCertName}, TypeUrl: sds.SecretType})
	s.quiet(200 * time.Millisecond)
	// The next change is pushed.
	f.bundle.Set([]*x509.Certificate{f.ca.Root(), catest.New(t).Root()})
	if second := s.next(5 * time.Second); second.VersionInfo == first.VersionInfo {
		t.Fatal("same version pushed after a change")
	}
}

func TestStreamRefusesUnknownNames(t *testing.T) {
	f := start(t, time.Hour)
	for _, tc := range []struct {
		req  *discoveryv3.DiscoveryRequest
		want string
	}{
		{&discoveryv3.DiscoveryRequest{ResourceNames: []string{"file-cert:/etc/certs/cert.pem"}, TypeUrl: sds.SecretType}, `unknown resource "file-cert:/etc/certs/cert.pem"`},
		{&discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}, TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}, "is not served"},
	} {
		stream, err := f.client.StreamSecrets(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := stream.Send(tc.req); err != nil {
			t.Fatal(err)
		}
		_, err = stream.Recv()
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want InvalidArgument saying %q", tc.req.ResourceNames, err, tc.want)
		}
		if _, err := f.client.FetchSecrets(context.Background(), tc.req); status.Code(err) != codes.InvalidArgument {
			t.Errorf("FetchSecrets %v: %v, want InvalidArgument", tc.req.ResourceNames, err)
		}
	}
}

func TestFetchSecrets(t *testing.T) {
	f := start(t, time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var resp *discoveryv3.DiscoveryResponse
	var err error
	for { // the first certificate may still be on its way
		resp, err = f.client.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{ResourceNames: []string{sds.WorkloadCertName, sds.RootCertName}, TypeUrl: sds.SecretType})
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	secs := secrets(t, resp)
	if len(secs) != 2 || secs[1].Name != sds.RootCertName {
		t.Fatalf("%d secrets, want default and ROOTCA", len(secs))
	}
	workloadLeaf(t, secs[0])
}

// A request that names a resource many times gets it once: a megabyte of
// "default" must not make the agent build and send the certificate and key
// a hundred thousand times.
func TestRepeatedNamesServedOnce(t *testing.T) {
	f := start(t, time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	names := make([]string, 50000)
	for i := range names {
		names[i] = []string{sds.WorkloadCertName, sds.RootCertName}[i%2]
	}
	// Held, as the agent in pod mode holds its identity, so that the unary
	// fetch finds a certificate.
	h := f.manager.Acquire(web, agent.StaticToken(web.String()))
	defer h.Release()
	if _, err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err := f.client.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{ResourceNames: names, TypeUrl: sds.SecretType})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.GetResources()); n != 2 {
		t.Errorf("%d resources for 2 names asked 25,000 times each, want 2", n)
	}

	stream, err := f.client.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: names, TypeUrl: sds.SecretType}); err != nil {
		t.Fatal(err)
	}
	got, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if n := len(got.GetResources()); n != 2 {
		t.Errorf("stream: %d resources for 2 names asked 25,000 times each, want 2", n)
	}
}

func TestListen(t *testing.T) {
	f := start(t, time.Hour)
	fi, err := os.Stat(f.socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	regular := filepath.Join(t.TempDir(), "file")
	os.WriteFile(regular, []byte("keep me"), 0o644)
	if _, err := sds.Listen(regular, 0o600); err == nil {
		t.Error("listening over a regular file succeeded")
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Error("a regular file was replaced")
	}
}

// TestEveryStreamGetsEveryRotation: rotations in quick succession must
// reach every open stream (a change landing between a send and the next
// wait was once lost).
func TestEveryStreamGetsEveryRotation(t *testing.T) {
	f := start(t, time.Hour)
	const n = 50
	streams := make([]*envoyStream, n)
	for i := range streams {
		streams[i] = f.open(t, sds.WorkloadCertName)
		streams[i].ack(streams[i].next(10 * time.Second))
	}
	for round := range 5 {
		f.manager.Renew(web)
		var want string
		for i, s := range streams {
			resp := s.next(10 * time.Second)
			// A stream may have been sent an intermediate version if two
			// rotations overlapped; it must end on the latest.
			for {
				select {
				case newer := <-s.resps:
					resp = newer
					continue
				default:
				}
				break
			}
			s.ack(resp)
			if i == 0 {
				want = resp.VersionInfo
			}
			if resp.VersionInfo != want {
				t.Fatalf("round %d: stream %d holds version %s, stream 0 holds %s", round, i, resp.VersionInfo, want)
			}
		}
	}
}

// TestStreamReconnect: Envoy reconnecting sends the version it holds and no
// nonce; the new stream answers with the current secret at once.
func TestStreamReconnect(t *testing.T) {
	f := start(t, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	first, err := f.client.StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: []string{sds.RootCertName}, TypeUrl: sds.SecretType})
	resp, err := first.Recv()
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	open := f.server.OpenStreams()
	deadline := time.Now().Add(5 * time.Second)
	for f.server.OpenStreams() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d streams still open after the client went away (was %d)", f.server.OpenStreams(), open)
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
	again, err := f.client.StreamSecrets(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	again.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, VersionInfo: resp.VersionInfo, ResourceNames: []string{sds.RootCertName}, TypeUrl: sds.SecretType})
	got, err := again.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got.VersionInfo != resp.VersionInfo || len(got.Resources) != 1 {
		t.Fatalf("reconnected stream got version %s with %d resources, want %s", got.VersionInfo, len(got.Resources), resp.VersionInfo)
	}
}

// TestServerNeedsItsOptions: a gRPC server made without ServerOptions
// cannot end its streams, so the service refuses to serve on it rather
// than keep streams past their token.
func TestServerNeedsItsOptions(t *testing.T) {
	c := catest.New(t)
	m, err := agent.NewManager(agent.Config{Signer: c})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	srv := sds.New(agent.Pod{Manager: m, ID: web, Tokens: agent.StaticToken(web.String())}, agent.NewBundle(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{c.Root()}), nil)
	dir, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	lis, err := sds.Listen(filepath.Join(dir, "socket"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "socket"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{sds.RootCertName}, TypeUrl: sds.SecretType})
	if _, err := stream.Recv(); status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "misconfigured") {
		t.Fatalf("stream on a server without ServerOptions: %v, want Internal (misconfigured)", err)
	}
}
