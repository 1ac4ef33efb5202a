package e2e

import (
	"context"
	"crypto/tls"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/agent"
)

// TestAgentPodMode runs meshid-agent against meshid-ca over TLS, both as
// processes: go-spiffe's X509Source gets the pod's certificate from the
// agent's socket and sees it rotate, and the files are written and rewritten.
func TestAgentPodMode(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(t, dir, stateDir)
	p := startCA(t, args...)
	p.WaitReady(t, 30*time.Second)

	socket := shortSocket(t)
	out := filepath.Join(dir, "certs")
	a := startAgent(t, append(podAgentArgs(t, issuer, dir, stateDir, p.GRPCAddr, socket), "--output-dir="+out, "--cert-ttl=4s")...)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The agent creates the socket at start; the source retries until then.
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
	if err != nil {
		t.Fatalf("go-spiffe X509Source: %v\n%s", err, a.log.String())
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	want := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	if svid.ID != want {
		t.Fatalf("SVID %s, want %s", svid.ID, want)
	}
	if err := src.WaitUntilUpdated(ctx); err != nil {
		t.Fatalf("no rotation of a 4s certificate: %v", err)
	}
	rotated, _ := src.GetX509SVID()
	if rotated.Certificates[0].SerialNumber.Cmp(svid.Certificates[0].SerialNumber) == 0 {
		t.Fatal("rotation delivered the same certificate")
	}
	fi, err := os.Stat(socket)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v (%v), want 0660", fi.Mode().Perm(), err)
	}
	// Files: a key pair that loads, the key private to its owner.
	// Each file is replaced atomically, but a reader can land between the
	// key's rename and the chain's during a rotation (every 2s here): as
	// agent.WriteFiles documents, it retries on a mismatch.
	var pair tls.Certificate
	for deadline := time.Now().Add(10 * time.Second); ; {
		pair, err = tls.LoadX509KeyPair(filepath.Join(out, agent.CertChainFile), filepath.Join(out, agent.KeyFile))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("files: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // retry interval
	}
	if pair.Leaf.URIs[0].String() != want.String() {
		t.Errorf("file certificate names %v", pair.Leaf.URIs)
	}
	if fi, _ := os.Stat(filepath.Join(out, agent.KeyFile)); fi.Mode().Perm() != 0o600 {
		t.Errorf("key.pem mode %v, want 0600", fi.Mode().Perm())
	}
}
