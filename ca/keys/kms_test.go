//go:build cgo

package keys_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/hsmtest"
)

// TestCAKeyInSoftHSM: with --ca-key-uri the intermediate's key is made in
// a (SoftHSM2) token and never written: the state directory names it, a
// restart finds it again, a renewal certifies it anew, and a stored CA is
// not loaded without it or with another key.
func TestCAKeyInSoftHSM(t *testing.T) {
	tok := hsmtest.SoftHSM(t, "meshid")
	uri := "pkcs11:module-path=" + tok.Module + ";token=meshid;id=01;object=meshid-ca?pin-value=" + tok.PIN
	ctx := context.Background()
	key, err := keys.OpenKMSKey(ctx, uri, keys.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Close()
	if strings.Contains(key.URI, tok.PIN) {
		t.Errorf("the recorded URI holds the PIN: %s", key.URI)
	}

	path := t.TempDir()
	dir, err := keys.OpenStateDir(path)
	if err != nil {
		t.Fatal(err)
	}
	dir.Key = &key.External
	m, created, err := dir.LoadOrCreate(func() (*keys.Material, error) {
		return keys.Generate(keys.Options{TrustDomain: "cluster.local", CAKey: &key.External})
	})
	if err != nil || !created {
		t.Fatalf("LoadOrCreate: %v", err)
	}
	if _, err := os.Stat(filepath.Join(path, "ca", keys.CAKeyFile)); err == nil {
		t.Errorf("%s written: the key must stay in the token", keys.CAKeyFile)
	}
	if b, err := os.ReadFile(filepath.Join(path, "ca", keys.CAKeyURIFile)); err != nil || strings.TrimSpace(string(b)) != key.URI {
		t.Errorf("%s: %q, %v", keys.CAKeyURIFile, b, err)
	}
	if _, err := m.Issuer(time.Now()); err != nil {
		t.Fatal(err)
	}

	// Renewed: the same key, a new certificate.
	next := *m
	if err := next.RenewIntermediate(keys.ECDSAP256, time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}
	if next.CACert.Equal(m.CACert) || !next.CACert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(m.CACert.PublicKey) {
		t.Error("renewal did not certify the token's key anew")
	}
	if err := dir.Save(ctx, m, &next); err != nil {
		t.Fatal(err)
	}
	dir.Close()

	// A restart: the token is opened again and the stored CA found.
	again, err := keys.OpenKMSKey(ctx, uri, keys.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	dir, err = keys.OpenStateDir(path)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	dir.Key = &again.External
	loaded, err := dir.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.CACert.Equal(next.CACert) {
		t.Error("reloaded another certificate")
	}
	if _, err := loaded.Issuer(time.Now()); err != nil {
		t.Fatal(err)
	}

	dir.Key = nil
	if _, err := dir.Load(ctx); err == nil || !strings.Contains(err.Error(), "no --ca-key-uri") {
		t.Errorf("loaded without the key: %v", err)
	}
	other, err := keys.OpenKMSKey(ctx, strings.Replace(uri, "id=01;object=meshid-ca", "id=02;object=other", 1), keys.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	dir.Key = &other.External
	if _, err := dir.Load(ctx); err == nil || !strings.Contains(err.Error(), "not the one") {
		t.Errorf("loaded with another key: %v", err)
	}
	if _, err := x509.ParseCertificate(loaded.CACert.Raw); err != nil {
		t.Fatal(err)
	}
}
