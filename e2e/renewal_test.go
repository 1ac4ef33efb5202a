package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/satoken"
)

// TestIntermediateRenewal: meshid-ca replaces its signing intermediate a
// third of its lifetime before it lapses, under the same root, stores it,
// signs with it at once, and loads it again after a restart.
func TestIntermediateRenewal(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(t, dir, stateDir)
	args = append(args, "--intermediate-ttl=6s")
	p := startCA(t, args...)
	p.WaitReady(t, 30*time.Second)
	caFile := filepath.Join(stateDir, "ca", "ca-cert.pem")
	roots := readRoots(t, filepath.Join(stateDir, "ca", "root-cert.pem"))
	// A 6s intermediate (backdated 5 minutes) is due at once: renewed at
	// start, before anything is signed with it.
	var generated, renewedFP string
	deadline := time.Now().Add(20 * time.Second)
	for renewedFP == "" {
		for _, rec := range p.LogRecords("CA generated") {
			generated, _ = rec["ca_fingerprint"].(string)
		}
		for _, rec := range p.LogRecords("intermediate renewed") {
			renewedFP, _ = rec["ca_fingerprint"].(string)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no intermediate renewal 20s after start with a 6s intermediate:\n%s", p.Log())
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
	if !strings.Contains(p.Metrics(t), `meshid_ca_intermediate_renewals_total{result="ok"}`) {
		t.Error("the renewal is not counted")
	}
	if renewedFP == generated || generated == "" {
		t.Fatalf("renewed intermediate %s, generated %s", renewedFP, generated)
	}
	renewed := readRoots(t, caFile)[0]
	if ca.Fingerprint(renewed) != renewedFP {
		t.Fatal("ca-cert.pem does not hold the renewed intermediate")
	}
	if got := readRoots(t, filepath.Join(stateDir, "ca", "root-cert.pem")); !got[0].Equal(roots[0]) {
		t.Fatal("the root changed with the intermediate")
	}
	if err := renewed.CheckSignatureFrom(roots[0]); err != nil {
		t.Fatalf("the new intermediate is not signed by the root: %v", err)
	}

	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	tok, _ := issuer.Token(satoken.Claims{Namespace: "shop", ServiceAccount: "web", Audiences: []string{"istio-ca"}})
	chain, err := sign(context.Background(), p.Client(t, roots), id, tok)
	if err != nil {
		t.Fatal(err)
	}
	if !chain[1].Equal(renewed) {
		t.Error("a certificate issued after the renewal is not signed by the renewed intermediate")
	}
	verifySVID(t, "a certificate from the renewed intermediate", chain, spiffeid.RequireTrustDomainFromString("cluster.local"), roots, id)

	// A restart keeps the root; the stored intermediate, due again, is
	// renewed before use.
	p.Stop(t)
	again := startCA(t, args...)
	again.WaitReady(t, 30*time.Second)
	if got := readRoots(t, filepath.Join(stateDir, "ca", "root-cert.pem")); !got[0].Equal(roots[0]) {
		t.Fatal("the root changed across the restart")
	}
	chain, err = sign(context.Background(), again.Client(t, roots), id, tok)
	if err != nil {
		t.Fatal(err)
	}
	verifySVID(t, "a certificate after the restart", chain, spiffeid.RequireTrustDomainFromString("cluster.local"), roots, id)
}
