package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/internal/satoken"
	"github.com/meshid/meshid/sds"
)

var web = spiffeid.RequireFromString(webID)

// agentFixture is a real SDS server (sds.Server over an agent.Manager
// signing with meshid's signing path) on a real Unix socket.
type agentFixture struct {
	ca      *catest.CA
	manager *agent.Manager
	bundle  *agent.Bundle
	socket  string
	issuer  *satoken.Issuer // node mode only
}

// startPod serves SDS as meshid-agent does in pod mode; hold says whether
// the pod's identity is held (as the agent does) before a proxy asks.
func startPod(t *testing.T, hold bool) *agentFixture {
	t.Helper()
	c := catest.New(t)
	m, err := agent.NewManager(agent.Config{Signer: c, TTL: time.Hour, Backoff: agent.Backoff{Initial: 100 * time.Millisecond, Max: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	f := &agentFixture{ca: c, manager: m, bundle: agent.NewBundle(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{c.Root()})}
	pod := agent.Pod{Manager: m, ID: web, Tokens: agent.StaticToken(web.String())}
	if hold {
		h := m.Acquire(web, pod.Tokens)
		t.Cleanup(h.Release)
		waitSVID(t, h)
	}
	f.socket = serveSDS(t, sds.New(pod, f.bundle, nil))
	return f
}

// startNode serves SDS as meshid-agent does in node mode: each caller is
// the identity its token proves, checked against the issuer's keys.
func startNode(t *testing.T) *agentFixture {
	t.Helper()
	issuer, err := satoken.New("https://meshidctl-test.local")
	if err != nil {
		t.Fatal(err)
	}
	keys := k8sauth.NewFileKeySet(writeFile(t, "jwks.json", issuer.JWKS()))
	if err := keys.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	auth := &k8sauth.JWKS{Issuer: issuer.URL, Audiences: []string{"istio-ca"}, Keys: keys}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	c := catest.New(t)
	c.Identify = func(token string) (spiffeid.ID, error) {
		caller, err := auth.Authenticate(context.Background(), token)
		if err != nil {
			return spiffeid.ID{}, err
		}
		return spiffeid.FromSegments(td, "ns", caller.Namespace, "sa", caller.ServiceAccount)
	}
	m, err := agent.NewManager(agent.Config{Signer: c, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	f := &agentFixture{ca: c, manager: m, bundle: agent.NewBundle(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{c.Root()}), issuer: issuer}
	f.socket = serveSDS(t, sds.New(agent.Node{Manager: m, Auth: auth, TrustDomain: td}, f.bundle, nil))
	return f
}

func (f *agentFixture) tokenFile(t *testing.T, ns, sa string) string {
	t.Helper()
	tok, err := f.issuer.Token(satoken.Claims{Namespace: ns, ServiceAccount: sa, Audiences: []string{"istio-ca"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, "token", []byte(tok+"\n"))
}

// serveSDS serves srv on a Unix socket under a short temporary directory
// (socket paths are limited to 108 bytes).
func serveSDS(t *testing.T, srv *sds.Server) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "socket")
	lis, err := sds.Listen(socket, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(sds.ServerOptions()...)
	srv.Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return socket
}

func waitSVID(t *testing.T, h *agent.Handle) *agent.SVID {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		changed := h.Changed()
		if svid := h.SVID(); svid != nil {
			return svid
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatal("no certificate within 10s")
		}
	}
}

func secretsJSON(t *testing.T, r result) secretsReport {
	t.Helper()
	var rep secretsReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("output is not a secrets report: %v\n%s", err, r.stdout)
	}
	return rep
}

// noKey fails if out holds any trace of the private key.
func noKey(t *testing.T, out string, svid *agent.SVID) {
	t.Helper()
	leaks := []string{"PRIVATE KEY", "-----BEGIN"}
	if svid != nil {
		lines := strings.Split(string(svid.KeyPEM()), "\n")
		leaks = append(leaks, lines[1][:24])
	}
	for _, leak := range leaks {
		if strings.Contains(out, leak) {
			t.Errorf("output holds %q:\n%s", leak, out)
		}
	}
}

func TestSecretsPodMode(t *testing.T) {
	f := startPod(t, true)
	h := f.manager.Acquire(web, agent.StaticToken(web.String()))
	defer h.Release()
	svid := waitSVID(t, h)
	leaf := svid.Leaf()

	r := runCLI(t, nil, "secrets", "--socket", f.socket, "-o", "json")
	r.want(t, exitOK)
	noKey(t, r.stdout+r.stderr, svid)
	rep := secretsJSON(t, r)
	if rep.Socket != f.socket || len(rep.Secrets) != 2 {
		t.Fatalf("report: %+v", rep)
	}
	def, root := rep.Secrets[0], rep.Secrets[1]
	want := secretRow{
		ResourceName: "default",
		Type:         "Cert Chain",
		Status:       "VALID",
		ValidCert:    true,
		SerialNumber: svid.Serial.Text(16),
		NotAfter:     leaf.NotAfter.UTC(),
		NotBefore:    leaf.NotBefore.UTC(),
		SPIFFEID:     webID,
		KeyMatches:   "yes",
		Version:      "[default=" + svid.Serial.Text(16) + "]",
	}
	if !reflect.DeepEqual(def, want) {
		t.Errorf("default:\n%+v\nwant\n%+v", def, want)
	}
	caRoot := f.ca.Root()
	if root.ResourceName != "ROOTCA" || root.Type != "CA" || root.Status != "VALID" || !root.ValidCert ||
		root.SerialNumber != caRoot.SerialNumber.Text(16) || root.SPIFFEID != "spiffe://cluster.local" || root.KeyMatches != "" || root.Version == "" {
		t.Errorf("ROOTCA: %+v", root)
	}

	// Every format, never the key; the table like istioctl's.
	for _, format := range []string{"table", "yaml"} {
		r := runCLI(t, nil, "secrets", "--socket", f.socket, "-o", format)
		r.want(t, exitOK)
		noKey(t, r.stdout+r.stderr, svid)
		if !strings.Contains(r.stdout, svid.Serial.Text(16)) {
			t.Errorf("-o %s does not show the serial:\n%s", format, r.stdout)
		}
		if format == "table" && !strings.HasPrefix(r.stdout, "RESOURCE NAME  TYPE        STATUS  VALID CERT  SERIAL NUMBER") {
			t.Errorf("table:\n%s", r.stdout)
		}
		if format == "yaml" {
			var back secretsReport
			if err := yaml.Unmarshal([]byte(r.stdout), &back); err != nil || !reflect.DeepEqual(back, rep) {
				t.Errorf("YAML says otherwise than JSON (%v):\n%s", err, r.stdout)
			}
		}
	}

	// A relative --socket works (gRPC needs it absolute).
	wd, _ := os.Getwd()
	rel, err := filepath.Rel(wd, f.socket)
	if err != nil {
		t.Fatal(err)
	}
	r = runCLI(t, nil, "secrets", "--socket", rel, "--names", "ROOTCA", "-o", "json")
	r.want(t, exitOK)
	if rep := secretsJSON(t, r); len(rep.Secrets) != 1 || rep.Secrets[0].ResourceName != "ROOTCA" || rep.Socket != f.socket {
		t.Errorf("--names ROOTCA with a relative socket: %+v", rep)
	}

	// EXPIRING when less than --expiring-within is left.
	r = runCLI(t, nil, "secrets", "--socket", f.socket, "--names", "default", "--expiring-within", "2h", "-o", "json")
	r.want(t, exitOK)
	if s := secretsJSON(t, r).Secrets[0]; s.Status != "EXPIRING" || !s.ValidCert {
		t.Errorf("with --expiring-within 2h: %+v", s)
	}
}

// TestSecretsFirstCertificate: when the agent holds no certificate for the
// caller yet, FetchSecrets says Unavailable; secrets then waits on a
// stream, as Envoy would.
func TestSecretsFirstCertificate(t *testing.T) {
	f := startPod(t, false)
	r := runCLI(t, nil, "secrets", "--socket", f.socket, "-o", "json")
	r.want(t, exitOK)
	noKey(t, r.stdout+r.stderr, nil)
	if s := secretsJSON(t, r).Secrets[0]; s.SPIFFEID != webID || s.KeyMatches != "yes" || s.Status != "VALID" {
		t.Errorf("default: %+v", s)
	}

	// With the CA down, nothing comes: the timeout says so.
	down := startPod(t, false)
	down.ca.SetDown(true)
	r = runCLI(t, nil, "secrets", "--socket", down.socket, "--names", "default", "--timeout", "500ms")
	r.want(t, exitFailed, "default: no answer from the agent at "+down.socket+" within 500ms (--timeout)")
}

func TestSecretsRootRotation(t *testing.T) {
	f := startPod(t, true)
	next := catest.New(t).Root()
	f.bundle.Set([]*x509.Certificate{f.ca.Root(), next})
	r := runCLI(t, nil, "secrets", "--socket", f.socket, "-o", "json")
	r.want(t, exitOK)
	rows := secretsJSON(t, r).Secrets
	if len(rows) != 3 {
		t.Fatalf("%d rows, want default and two roots: %+v", len(rows), rows)
	}
	for i, root := range []*x509.Certificate{f.ca.Root(), next} {
		row := rows[i+1]
		if row.ResourceName != "ROOTCA" || row.SerialNumber != root.SerialNumber.Text(16) || row.Version != rows[1].Version {
			t.Errorf("root %d: %+v", i+1, row)
		}
	}
	// The leaf chains to the current root only: only it vouches for the trust domain.
	if rows[1].SPIFFEID != "spiffe://cluster.local" || rows[2].SPIFFEID != "-" {
		t.Errorf("roots' SPIFFE IDs: %q, %q", rows[1].SPIFFEID, rows[2].SPIFFEID)
	}
	if !rows[0].ValidCert {
		t.Errorf("default: %+v", rows[0])
	}
}

func TestSecretsNodeMode(t *testing.T) {
	f := startNode(t)

	// No token: the agent refuses the workload certificate; the roots are
	// shown and the exit code is 1.
	r := runCLI(t, nil, "secrets", "--socket", f.socket, "-o", "json")
	r.want(t, exitFailed, "default: the agent answered Unauthenticated: no token: send the pod's projected service-account token as authorization: Bearer <token>")
	if rows := secretsJSON(t, r).Secrets; len(rows) != 1 || rows[0].ResourceName != "ROOTCA" || rows[0].SPIFFEID != "-" {
		t.Errorf("without a token: %+v", rows)
	}
	r = runCLI(t, nil, "secrets", "--socket", f.socket, "--names", "default")
	r.want(t, exitFailed, "Unauthenticated")
	if r.stdout != "" {
		t.Errorf("output with nothing fetched:\n%s", r.stdout)
	}

	// A bad token.
	runCLI(t, nil, "secrets", "--socket", f.socket, "--token-file", writeFile(t, "bad", []byte("not-a-jwt")), "--names", "default").
		want(t, exitFailed, "default: the agent answered Unauthenticated: token refused")

	// The proxy's token: the identity it proves.
	tokenFile := f.tokenFile(t, "shop", "web")
	for _, format := range []string{"json", "table", "yaml"} {
		r = runCLI(t, nil, "secrets", "--socket", f.socket, "--token-file", tokenFile, "-o", format)
		r.want(t, exitOK)
		noKey(t, r.stdout+r.stderr, nil)
		tok, _ := os.ReadFile(tokenFile)
		if strings.Contains(r.stdout+r.stderr, strings.TrimSpace(string(tok))) {
			t.Error("the token is in the output")
		}
		if format != "json" {
			continue
		}
		rows := secretsJSON(t, r).Secrets
		if len(rows) != 2 || rows[0].SPIFFEID != webID || rows[0].KeyMatches != "yes" || !rows[0].ValidCert || rows[1].SPIFFEID != "spiffe://cluster.local" {
			t.Errorf("with web's token: %+v", rows)
		}
	}
}

func TestSecretsErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "socket")
	runCLI(t, nil, "secrets", "--socket", missing).want(t, exitFailed, "no agent socket at "+missing)
	notSocket := writeFile(t, "file", []byte("x"))
	runCLI(t, nil, "secrets", "--socket", notSocket).want(t, exitFailed, notSocket+" is not a Unix socket")

	// A stale socket: nothing listens.
	dir, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	stale := filepath.Join(dir, "socket")
	lis, err := sds.Listen(stale, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	lis.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	lis.Close()
	runCLI(t, nil, "secrets", "--socket", stale).want(t, exitFailed, "cannot connect to the agent at "+stale)

	f := startPod(t, true)
	runCLI(t, nil, "secrets", "--socket", f.socket, "--names", "file-cert:/etc/x").
		want(t, exitFailed, `file-cert:/etc/x: the agent answered InvalidArgument: sds: unknown resource "file-cert:/etc/x"`)
	runCLI(t, nil, "secrets", "--socket", f.socket, "-o", "wide").want(t, exitUsage, "unknown output format")
	runCLI(t, nil, "secrets", "--socket", f.socket, "--token-file", missing).want(t, exitUsage, "--token-file: open "+missing)
	runCLI(t, nil, "secrets", "--socket", f.socket, "--token-file", writeFile(t, "empty", []byte("\n"))).want(t, exitUsage, "is empty")
	runCLI(t, nil, "secrets", "--socket", f.socket, "extra").want(t, exitUsage, "secrets takes no arguments")
	runCLI(t, nil, "secrets", "--socket", f.socket, "--timeout", "0s").want(t, exitUsage, "--timeout must be positive")
}

// testSecrets is what an agent would serve for the test chain.
func testSecrets(t *testing.T, c testChain, key []byte, roots ...*x509.Certificate) []servedSecret {
	t.Helper()
	def, err := readSecret(&tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: pemOf(c.leaf, c.inter)}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: key}},
	}}}, "[default=1]")
	if err != nil {
		t.Fatal(err)
	}
	rootCA, err := readSecret(&tlsv3.Secret{Name: "ROOTCA", Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: string(pemOf(roots...))}},
	}}}, "[ROOTCA=2]")
	if err != nil {
		t.Fatal(err)
	}
	return []servedSecret{def, rootCA}
}

func TestReadSecretChecksKey(t *testing.T) {
	c := newTestChain(t, 1)
	other := newTestChain(t, 7)
	key := keyPEM(t, c.leafKey)
	served := testSecrets(t, c, key, c.root)
	if served[0].keyErr != "" {
		t.Errorf("the leaf's key: %s", served[0].keyErr)
	}
	if strings.Trim(string(key), "\x00") != "" {
		t.Error("the key's bytes were not cleared")
	}
	for name, key := range map[string][]byte{
		"another key": keyPEM(t, other.leafKey),
		"garbage":     []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
		"none":        nil,
	} {
		rows := secretRows(testSecrets(t, c, key, c.root), epoch, 10*time.Minute)
		if rows[0].KeyMatches != "no" || rows[0].ValidCert || len(rows[0].Problems) != 1 {
			t.Errorf("%s: %+v", name, rows[0])
		}
		noKey(t, strings.Join(rows[0].Problems, "\n"), nil)
	}
	// A leaf that does not chain to the ROOTCA served is not a valid cert.
	rows := secretRows(testSecrets(t, c, keyPEM(t, c.leafKey), other.root), epoch, 10*time.Minute)
	if rows[0].ValidCert || len(rows[0].Problems) != 1 || !strings.Contains(rows[0].Problems[0], "does not verify to the ROOTCA served") || rows[1].SPIFFEID != "-" {
		t.Errorf("foreign root: %+v", rows)
	}
}

func TestSecretsStatus(t *testing.T) {
	c := newTestChain(t, 1)
	served := testSecrets(t, c, keyPEM(t, c.leafKey), c.root)
	for _, tc := range []struct {
		now   time.Time
		want  string
		valid bool
	}{
		{epoch, "VALID", true},
		{epoch.Add(55 * time.Minute), "EXPIRING", true},
		{epoch.Add(time.Hour), "EXPIRED", false},
		{epoch.Add(-2 * time.Minute), "NOT YET VALID", false},
	} {
		row := secretRows(served, tc.now, 10*time.Minute)[0]
		if row.Status != tc.want || row.ValidCert != tc.valid {
			t.Errorf("at %s: %s (valid %t), want %s (valid %t); problems %q", tc.now, row.Status, row.ValidCert, tc.want, tc.valid, row.Problems)
		}
	}
}

// TestSecretsGolden compares the table with testdata/secrets.golden.
func TestSecretsGolden(t *testing.T) {
	c := newTestChain(t, 1)
	next := newTestChain(t, 7)
	rep := secretsReport{Socket: "/run/meshid/socket", Secrets: secretRows(testSecrets(t, c, keyPEM(t, c.leafKey), c.root, next.root), epoch, 10*time.Minute)}
	var b strings.Builder
	if err := render(&b, "table", rep, rep.table); err != nil {
		t.Fatal(err)
	}
	golden(t, "secrets.golden", b.String())

	// And JSON round-trips.
	j, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back secretsReport
	if err := json.Unmarshal(j, &back); err != nil || !reflect.DeepEqual(back, rep) {
		t.Errorf("JSON round trip (%v):\n%+v\nwant\n%+v", err, back, rep)
	}
}

// streamOnly is an SDS service that serves streams only, as Istio's
// pilot-agent does: FetchSecrets answers Unimplemented.
type streamOnly struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	srv *sds.Server
}

func (s streamOnly) StreamSecrets(gs grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	return s.srv.StreamSecrets(gs)
}

// TestSecretsStreamOnly: against an agent without FetchSecrets, secrets
// reads the same certificate through a stream.
func TestSecretsStreamOnly(t *testing.T) {
	f := startPod(t, true)
	h := f.manager.Acquire(web, agent.StaticToken(web.String()))
	defer h.Release()
	svid := waitSVID(t, h)

	dir, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "socket")
	lis, err := sds.Listen(socket, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(sds.ServerOptions()...)
	pod := agent.Pod{Manager: f.manager, ID: web, Tokens: agent.StaticToken(web.String())}
	secretv3.RegisterSecretDiscoveryServiceServer(g, streamOnly{srv: sds.New(pod, f.bundle, nil)})
	go g.Serve(lis)
	t.Cleanup(g.Stop)

	r := runCLI(t, nil, "secrets", "--socket", socket, "-o", "json")
	r.want(t, exitOK)
	noKey(t, r.stdout+r.stderr, svid)
	rep := secretsJSON(t, r)
	if len(rep.Secrets) != 2 || rep.Secrets[0].SerialNumber != svid.Serial.Text(16) || rep.Secrets[0].SPIFFEID != webID ||
		rep.Secrets[1].ResourceName != "ROOTCA" || !rep.Secrets[1].ValidCert {
		t.Errorf("through a stream-only agent: %+v", rep.Secrets)
	}
}

// With federation the agent serves ROOTCA as Envoy's SPIFFE validator: a
// row per root, named by the trust domain it is bound to, and the leaf
// checked against its own trust domain's roots only.
func TestSecretsFederatedRootCA(t *testing.T) {
	f := startPod(t, true)
	other := spiffeid.RequireTrustDomainFromString("other.example")
	peer := catest.NewIn(t, other.String())
	f.bundle.SetFederated(map[spiffeid.TrustDomain]*spiffebundle.Bundle{other: spiffebundle.FromX509Authorities(other, []*x509.Certificate{peer.Root()})})

	r := runCLI(t, nil, "secrets", "--socket", f.socket, "-o", "json")
	r.want(t, exitOK)
	rep := secretsJSON(t, r)
	if len(rep.Secrets) != 3 {
		t.Fatalf("report: %+v", rep)
	}
	def, own, fed := rep.Secrets[0], rep.Secrets[1], rep.Secrets[2]
	if !def.ValidCert || len(def.Problems) != 0 {
		t.Errorf("the leaf against its trust domain's roots: %+v", def)
	}
	if own.SPIFFEID != "spiffe://cluster.local" || own.SerialNumber != f.ca.Root().SerialNumber.Text(16) ||
		fed.SPIFFEID != "spiffe://other.example" || fed.SerialNumber != peer.Root().SerialNumber.Text(16) || fed.ResourceName != "ROOTCA" {
		t.Errorf("ROOTCA rows: %+v, %+v", own, fed)
	}
}
