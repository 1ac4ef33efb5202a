package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/satoken"
)

// TestRestart stops meshid-ca and starts it again on the same state
// directory: it must load the CA it generated, not make a new one, so that
// certificates issued before the restart stay valid.
func TestRestart(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state") // absent: meshid-ca creates it
	issuer, args := jwksCAArgs(t, dir, stateDir)
	rootPath := filepath.Join(stateDir, "ca", "root-cert.pem")
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id := spiffeid.RequireFromPath(td, "/ns/restart/sa/web")
	token, err := issuer.Token(satoken.Claims{Namespace: "restart", ServiceAccount: "web",
		PodName: "web-0", PodUID: "6c1e8f0a-4f7b-4c57-9a43-1d2b8e0c5a10", Audiences: []string{"istio-ca"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	// First start: the CA is generated.
	first := startCA(t, args...)
	first.WaitReady(t, 30*time.Second)
	if n := len(first.LogRecords("CA generated")); n != 1 {
		t.Fatalf("first start: %d \"CA generated\" log records, want 1", n)
	}
	if n := len(first.LogRecords("CA loaded")); n != 0 {
		t.Errorf("first start on an empty state directory logged \"CA loaded\"")
	}
	rootPEM, err := os.ReadFile(rootPath)
	if err != nil {
		t.Fatal(err)
	}
	roots := readRoots(t, rootPath)
	if len(roots) != 1 {
		t.Fatalf("%s holds %d certificates, want 1", rootPath, len(roots))
	}
	root := roots[0]
	rootFP := ca.Fingerprint(root)
	checkLoggedRoot(t, first, "CA generated", rootFP)

	before, err := sign(ctx, first.Client(t, roots), id, token)
	if err != nil {
		t.Fatalf("first start: issuing: %v", err)
	}
	if got := ca.Fingerprint(before[len(before)-1]); got != rootFP {
		t.Fatalf("first start: chain ends in root %s, root-cert.pem holds %s", got, rootFP)
	}
	verifySVID(t, "first start: new certificate", before, td, roots, id)

	first.Stop(t)
	if code := first.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("meshid-ca exited with code %d after SIGTERM, want 0", code)
	}
	if len(first.LogRecords("shutting down")) == 0 {
		t.Errorf("meshid-ca did not log \"shutting down\" on SIGTERM")
	}
	checkStateModes(t, stateDir)

	// Second start on the same state directory: the CA is loaded.
	second := startCA(t, args...)
	second.WaitReady(t, 30*time.Second)
	if n := len(second.LogRecords("CA loaded")); n != 1 {
		t.Errorf("second start: %d \"CA loaded\" log records, want 1", n)
	}
	if n := len(second.LogRecords("CA generated")); n != 0 {
		t.Errorf("second start: logged \"CA generated\": the CA was replaced")
	}
	checkLoggedRoot(t, second, "CA loaded", rootFP)

	rootPEM2, err := os.ReadFile(rootPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rootPEM, rootPEM2) {
		t.Fatalf("root-cert.pem changed across the restart:\nbefore:\n%s\nafter:\n%s", rootPEM, rootPEM2)
	}
	roots2 := readRoots(t, rootPath)

	// A certificate from before the restart verifies against the bundle
	// read after it.
	verifySVID(t, "certificate issued before the restart", before, td, roots2, id)

	after, err := sign(ctx, second.Client(t, roots2), id, token)
	if err != nil {
		t.Fatalf("second start: issuing: %v", err)
	}
	if got := ca.Fingerprint(after[len(after)-1]); got != rootFP {
		t.Errorf("second start: chain ends in root %s, want %s", got, rootFP)
	}
	verifySVID(t, "certificate issued after the restart", after, td, roots2, id)
	// The signing intermediates were loaded too, not re-made under the old root.
	if len(after) != len(before) {
		t.Fatalf("chain length %d after the restart, %d before", len(after), len(before))
	}
	for i := 1; i < len(after); i++ {
		if !after[i].Equal(before[i]) {
			t.Errorf("chain element %d (%s) differs across the restart", i, after[i].Subject)
		}
	}
	if after[0].SerialNumber.Cmp(before[0].SerialNumber) == 0 {
		t.Errorf("certificates issued before and after the restart share serial %x", after[0].SerialNumber)
	}
	checkStateModes(t, stateDir)
}

// verifySVID checks chain (leaf first, root last) with go-spiffe against
// roots and that it names want.
func verifySVID(t *testing.T, what string, chain []*x509.Certificate, td spiffeid.TrustDomain, roots []*x509.Certificate, want spiffeid.ID) {
	t.Helper()
	if len(chain) < 2 {
		t.Fatalf("%s: chain of %d certificates, want leaf..root", what, len(chain))
	}
	got, _, err := x509svid.Verify(chain[:len(chain)-1], x509bundle.FromX509Authorities(td, roots))
	if err != nil {
		t.Fatalf("%s: x509svid.Verify: %v", what, err)
	}
	if got != want {
		t.Fatalf("%s: names %s, want %s", what, got, want)
	}
}

// checkLoggedRoot checks that the log record msg carries the root's
// fingerprint.
func checkLoggedRoot(t *testing.T, p *caProcess, msg, rootFP string) {
	t.Helper()
	recs := p.LogRecords(msg)
	if len(recs) == 0 {
		t.Errorf("no %q log record", msg)
		return
	}
	if got, _ := recs[0]["root_fingerprint"].(string); !strings.EqualFold(got, rootFP) {
		t.Errorf("%q log record: root_fingerprint %q, root-cert.pem has %q", msg, got, rootFP)
	}
}

// checkStateModes checks that the state directory and its ca directory are
// private and that every key file in it is readable by its owner only.
func checkStateModes(t *testing.T, stateDir string) {
	t.Helper()
	for _, d := range []string{stateDir, filepath.Join(stateDir, "ca")} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if mode := fi.Mode(); !mode.IsDir() || mode.Perm() != 0o700 {
			t.Errorf("%s: mode %v, want drwx------", d, mode)
		}
	}
	entries, err := os.ReadDir(filepath.Join(stateDir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	keys := 0
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), "-key.pem") {
			continue
		}
		keys++
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if mode := fi.Mode(); !mode.IsRegular() || mode.Perm() != 0o600 {
			t.Errorf("%s: mode %v, want -rw-------", filepath.Join(stateDir, "ca", e.Name()), mode)
		}
	}
	// A generated CA keeps both its root key and its intermediate key.
	if keys != 2 {
		t.Errorf("%s holds %d key files, want 2 (root-key.pem, ca-key.pem)", filepath.Join(stateDir, "ca"), keys)
	}
}
