package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/pgtest"
	"github.com/meshid/meshid/internal/satoken"
)

// adminArgs lets the service account ops/admin use the admin API.
var adminArgs = []string{"--admin-service-accounts=ops/admin"}

// ctl runs meshidctl against p's admin API as ops/admin and returns its
// stdout, stderr and exit code.
type ctl struct {
	t       *testing.T
	p       *caProcess
	caFile  string
	tokFile string
}

func newCtl(t *testing.T, p *caProcess, issuer *satoken.Issuer, rootFile string) *ctl {
	t.Helper()
	tok, err := issuer.Token(satoken.Claims{Namespace: "ops", ServiceAccount: "admin", Audiences: []string{"istio-ca"}})
	if err != nil {
		t.Fatal(err)
	}
	tokFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	return &ctl{t: t, p: p, caFile: rootFile, tokFile: tokFile}
}

func (c *ctl) run(args ...string) (stdout, stderr string, code int) {
	c.t.Helper()
	if len(args) > 0 && args[0] != "inspect" {
		args = append(args, "--server="+c.p.AdminAddr, "--server-name=localhost", "--ca-file="+c.caFile, "--token-file="+c.tokFile)
	}
	cmd := exec.Command(filepath.Join(binDir, "meshidctl"), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code = 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			c.t.Fatalf("meshidctl %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// certs lists every certificate the ledger holds, through meshidctl.
func (c *ctl) certs(args ...string) []map[string]any {
	c.t.Helper()
	out, errOut, code := c.run(append([]string{"certs", "--all", "--limit=1000", "-o", "json"}, args...)...)
	if code != 0 {
		c.t.Fatalf("meshidctl certs: exit %d: %s", code, errOut)
	}
	var rows []map[string]any
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		c.t.Fatalf("meshidctl certs -o json: %v\n%s", err, out)
	}
	return rows
}

func serialSet(rows []map[string]any) map[string]bool {
	s := map[string]bool{}
	for _, r := range rows {
		s[r["serial"].(string)] = true
	}
	return s
}

// TestCrashKeepsEveryIssuedCertificate: meshid-ca killed with SIGKILL in
// the middle of a load; once restarted, its ledger holds every certificate
// any client received.
func TestCrashKeepsEveryIssuedCertificate(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(t, dir, stateDir)
	args = append(append(args, "--rate-limit=0"), adminArgs...)
	p := startCA(t, args...)
	p.WaitReady(t, 30*time.Second)
	roots := readRoots(t, filepath.Join(stateDir, "ca", "root-cert.pem"))
	client := p.Client(t, roots)

	var (
		mu       sync.Mutex
		received = map[string]bool{}
		enough   = make(chan struct{})
		once     sync.Once
		wg       sync.WaitGroup
	)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for w := range 16 {
		id := spiffeid.RequireFromString(fmt.Sprintf("spiffe://cluster.local/ns/load/sa/w%d", w))
		tok, err := issuer.Token(satoken.Claims{Namespace: "load", ServiceAccount: fmt.Sprintf("w%d", w), Audiences: []string{"istio-ca"}})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				chain, err := sign(ctx, client, id, tok)
				if err != nil {
					continue // the CA is gone: keep trying until told to stop
				}
				mu.Lock()
				received[fmt.Sprintf("%x", chain[0].SerialNumber)] = true
				if len(received) >= 1000 {
					once.Do(func() { close(enough) })
				}
				mu.Unlock()
			}
		}()
	}
	select {
	case <-enough:
	case <-time.After(60 * time.Second):
		t.Fatal("1000 certificates not issued within 60s")
	}
	// Every certificate a client holds was recorded first; the commits
	// that carried them are counted.
	metrics := p.Metrics(t)
	records, commits := sumMetric(metrics, "meshid_ca_ledger_records_total"), sumMetric(metrics, "meshid_ca_ledger_commits_total")
	if records < 1000 || commits < 1 || commits > records {
		t.Errorf("meshid_ca_ledger_records_total %v, meshid_ca_ledger_commits_total %v; want at least 1000 records in at most as many commits", records, commits)
	}
	// In the middle of the load: requests are in flight as it dies.
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-p.exited
	cancel()
	wg.Wait()
	mu.Lock()
	got := len(received)
	mu.Unlock()

	again := startCA(t, args...)
	again.WaitReady(t, 30*time.Second)
	recorded := serialSet(newCtl(t, again, issuer, filepath.Join(stateDir, "ca", "root-cert.pem")).certs())
	var missing []string
	for serial := range received {
		if !recorded[serial] {
			missing = append(missing, serial)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("%d of %d certificates clients received are not in the ledger after kill -9: %v", len(missing), got, missing)
	}
	t.Logf("all %d certificates received are in the ledger, which holds %d (a certificate can be recorded and then lost with the connection)", got, len(recorded))
}

// pluginCA writes a CA in Istio's cacerts layout that several meshid-ca
// processes can share.
func pluginCA(t *testing.T, dir string) string {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	files, err := m.Files()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestReplicasShareOnePostgresLedger: two meshid-ca processes on one
// PostgreSQL ledger: each one's certificates are listed through the other,
// and a deny made through one is enforced by the other.
func TestReplicasShareOnePostgresLedger(t *testing.T) {
	dsn := pgtest.Database(t)
	dir := t.TempDir()
	issuer, _ := jwksCAArgs(t, dir, "")
	plugin := pluginCA(t, filepath.Join(dir, "cacerts"))
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn), 0o600); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"--ca-source=plugin", "--plugin-dir=" + plugin,
		"--auth=jwks", "--jwks-file=" + filepath.Join(dir, "jwks.json"), "--token-issuer=https://meshid-e2e.local",
		"--ledger=postgres", "--ledger-dsn-file=" + dsnFile, "--deny-refresh-interval=200ms"}, adminArgs...)
	// Started together: both apply the schema migrations at once.
	a, b := launchCA(t, args...), launchCA(t, args...)
	a.WaitServing(t)
	b.WaitServing(t)
	a.WaitReady(t, 30*time.Second)
	b.WaitReady(t, 30*time.Second)
	rootFile := filepath.Join(plugin, "root-cert.pem")
	roots := readRoots(t, rootFile)

	issue := func(p *caProcess, sa string) (string, error) {
		tok, err := issuer.Token(satoken.Claims{Namespace: "shop", ServiceAccount: sa, Audiences: []string{"istio-ca"}})
		if err != nil {
			t.Fatal(err)
		}
		chain, err := sign(context.Background(), p.Client(t, roots), spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/"+sa), tok)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%x", chain[0].SerialNumber), nil
	}
	fromA, err := issue(a, "web")
	if err != nil {
		t.Fatal(err)
	}
	fromB, err := issue(b, "api")
	if err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]*caProcess{"a": a, "b": b} {
		got := serialSet(newCtl(t, p, issuer, rootFile).certs())
		if !got[fromA] || !got[fromB] {
			t.Errorf("meshidctl certs through %s lacks a replica's certificate: %v (want %s and %s)", name, got, fromA, fromB)
		}
	}

	out, errOut, code := newCtl(t, a, issuer, rootFile).run("deny", "spiffe://cluster.local/ns/shop/sa/api", "--reason", "e2e: leaked token")
	if code != 0 || !strings.Contains(out, "denied by system:serviceaccount:ops:admin") {
		t.Fatalf("meshidctl deny through a: exit %d: %s%s", code, out, errOut)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := issue(b, "api")
		if status.Code(err) == codes.PermissionDenied {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("b still answers %v for a denied identity 10s after the deny through a", err)
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
	if _, err := issue(b, "web"); err != nil {
		t.Errorf("another identity refused by b: %v", err)
	}
	out, _, _ = newCtl(t, b, issuer, rootFile).run("identities", "-n", "shop")
	if !strings.Contains(out, "yes: e2e: leaked token") {
		t.Errorf("meshidctl identities through b does not show the denial:\n%s", out)
	}
}

// TestMeshidctl runs the CLI against a real meshid-ca and agent.
func TestMeshidctl(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(t, dir, stateDir)
	p := startCA(t, append(args, adminArgs...)...)
	p.WaitReady(t, 30*time.Second)
	rootFile := filepath.Join(stateDir, "ca", "root-cert.pem")
	c := newCtl(t, p, issuer, rootFile)

	socket := shortSocket(t)
	startAgent(t, podAgentArgs(t, issuer, dir, stateDir, p.GRPCAddr, socket)...)
	// The agent's first certificate is in the ledger once it is served.
	deadline := time.Now().Add(30 * time.Second)
	var rows []map[string]any
	for len(rows) == 0 {
		rows = c.certs("--spiffe-id=spiffe://cluster.local/ns/shop/sa/web")
		if time.Now().After(deadline) {
			t.Fatal("no certificate for shop/web in the ledger 30s after the agent started")
		}
		if len(rows) == 0 {
			time.Sleep(100 * time.Millisecond) // poll interval
		}
	}
	if rows[0]["namespace"] != "shop" || rows[0]["service_account"] != "web" || rows[0]["auth_method"] != "jwks" {
		t.Errorf("ledger record %v", rows[0])
	}
	serial := rows[0]["serial"].(string)

	out, errOut, code := c.run("certs", "--expiring-within", "2h")
	if code != 0 || !strings.Contains(out, serial) || !strings.HasPrefix(out, "SERIAL") {
		t.Errorf("certs --expiring-within 2h: exit %d\n%s%s", code, out, errOut)
	}
	if out, _, code := c.run("certs", "--serial", "ffffffff"); code != 3 {
		t.Errorf("certs --serial of nothing: exit %d, want 3\n%s", code, out)
	}
	out, _, code = c.run("identities")
	if code != 0 || !strings.Contains(out, "spiffe://cluster.local/ns/shop/sa/web") {
		t.Errorf("identities: exit %d\n%s", code, out)
	}

	out, _, code = c.run("bundle")
	want, _ := os.ReadFile(rootFile)
	if code != 0 || out != string(want) {
		t.Errorf("bundle: exit %d, not the CA's root-cert.pem:\n%s", code, out)
	}
	out, _, code = c.run("bundle", "--format", "spiffe")
	if b, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("cluster.local"), []byte(out)); code != 0 || err != nil || len(b.X509Authorities()) != 1 {
		t.Errorf("bundle --format spiffe: exit %d, %v\n%s", code, err, out)
	}

	out, errOut, code = c.run("check", "--agent-socket", socket)
	if code != 0 || !strings.Contains(out, "Status check results are") || !strings.Contains(out, "verifies against the CA's bundle") {
		t.Errorf("check: exit %d\n%s%s", code, out, errOut)
	}

	// A token of a non-admin is refused, with exit 1.
	tok, _ := issuer.Token(satoken.Claims{Namespace: "shop", ServiceAccount: "web", Audiences: []string{"istio-ca"}})
	os.WriteFile(c.tokFile, []byte(tok), 0o600)
	if _, errOut, code := c.run("certs"); code != 1 || !strings.Contains(errOut, "not an administrator") {
		t.Errorf("non-admin: exit %d: %s", code, errOut)
	}
}
