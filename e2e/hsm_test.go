//go:build cgo

package e2e

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/hsmtest"
	"github.com/meshid/meshid/internal/satoken"
	"github.com/meshid/meshid/internal/steptest"
)

// TestCAKeyInHSM: meshid-ca with --ca-key-uri keeps its intermediate's key
// in a SoftHSM2 token, with a CA it generates (and after a restart) and
// with an intermediate step-ca signs: workloads get certificates, and no
// file holds the intermediate's private key.
func TestCAKeyInHSM(t *testing.T) {
	tok := hsmtest.SoftHSM(t, "meshid")
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pin")
	mustWrite(t, pinFile, []byte(tok.PIN), 0o600)
	keyURI := func(id, object string) string {
		return "--ca-key-uri=pkcs11:module-path=" + tok.Module + ";token=meshid;id=" + id + ";object=" + object + "?pin-source=" + pinFile
	}
	web := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	issuedUnder := func(t *testing.T, p *caProcess, issuer *satoken.Issuer, roots []*x509.Certificate) *x509.Certificate {
		t.Helper()
		tok, err := issuer.Token(satoken.Claims{Namespace: "shop", ServiceAccount: "web", Audiences: []string{"istio-ca"}})
		if err != nil {
			t.Fatal(err)
		}
		chain, err := sign(context.Background(), p.Client(t, roots), web, tok)
		if err != nil {
			t.Fatal(err)
		}
		return chain[1]
	}
	noPrivateKeyBut := func(t *testing.T, caDir string, allowed ...string) {
		t.Helper()
		entries, err := os.ReadDir(caDir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			b, _ := os.ReadFile(filepath.Join(caDir, e.Name()))
			if strings.Contains(string(b), "PRIVATE KEY") && !slices.Contains(allowed, e.Name()) {
				t.Errorf("%s holds a private key", e.Name())
			}
		}
		if b, err := os.ReadFile(filepath.Join(caDir, keys.CAKeyURIFile)); err != nil || strings.Contains(string(b), tok.PIN) {
			t.Errorf("%s: %q, %v (it must name the key, without the PIN)", keys.CAKeyURIFile, b, err)
		}
	}

	t.Run("generated", func(t *testing.T) {
		stateDir := filepath.Join(dir, "generated")
		issuer, args := jwksCAArgs(t, dir, stateDir)
		args = append(args, keyURI("01", "meshid-ca"))
		p := startCA(t, args...)
		p.WaitReady(t, 60*time.Second)
		if recs := p.LogRecords("CA key in a KMS or HSM"); len(recs) != 1 || strings.Contains(recs[0]["key"].(string), tok.PIN) {
			t.Errorf("log records of the HSM key: %v", recs)
		}
		roots := readRoots(t, filepath.Join(stateDir, "ca", keys.RootCertFile))
		ti := issuer
		first := issuedUnder(t, p, ti, roots)
		noPrivateKeyBut(t, filepath.Join(stateDir, "ca"), keys.RootKeyFile)
		p.Stop(t)

		// A restart opens the token again and signs with the same key.
		p = startCA(t, args...)
		p.WaitReady(t, 60*time.Second)
		if again := issuedUnder(t, p, ti, roots); !again.Equal(first) {
			t.Errorf("after a restart, another intermediate (%s, was %s)", ca.Fingerprint(again), ca.Fingerprint(first))
		}
		p.Stop(t)

		// Another key than the stored CA certifies: refused at start.
		bad := launchCA(t, append(args[:len(args)-1], keyURI("02", "other"))...)
		select {
		case <-bad.exited:
		case <-time.After(60 * time.Second):
			t.Fatal("meshid-ca started with a key the stored CA does not certify")
		}
		if !strings.Contains(bad.Log(), "is not the one the stored CA certificate certifies") {
			t.Errorf("its words:\n%s", bad.Log())
		}
	})

	t.Run("step-ca", func(t *testing.T) {
		s := steptest.Start(t, steptest.Options{})
		rootFile := filepath.Join(dir, "step-root.pem")
		mustWrite(t, rootFile, ca.EncodePEM(s.Root), 0o644)
		passFile := filepath.Join(dir, "step-password")
		mustWrite(t, passFile, []byte(s.Provisioner.Password), 0o600)
		stateDir := filepath.Join(dir, "step")
		issuer, args := jwksCAArgs(t, dir, stateDir)
		args = append(args[1:], "--ca-source=step", "--ca-store=dir", "--step-ca-url="+s.URL, "--step-root-file="+rootFile,
			"--step-provisioner="+s.Provisioner.Name, "--step-password-file="+passFile, "--intermediate-ttl=72h", keyURI("03", "meshid-step"))
		p := startCA(t, args...)
		p.WaitReady(t, 60*time.Second)
		inter := issuedUnder(t, p, issuer, []*x509.Certificate{s.Root})
		if err := inter.CheckSignatureFrom(s.Intermediate); err != nil {
			t.Errorf("meshid's intermediate is not step-ca's: %v", err)
		}
		noPrivateKeyBut(t, filepath.Join(stateDir, "ca"))
	})
}
