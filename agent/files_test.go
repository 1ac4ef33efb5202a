package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/catest"
)

func readLeaf(t *testing.T, dir string) *x509.Certificate {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, CertChainFile), filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatalf("files do not load as a key pair: %v", err)
	}
	return pair.Leaf
}

func TestWriteFiles(t *testing.T) {
	c := catest.New(t)
	key, _ := NewKey(RSA2048)
	csrPEM, _ := NewCSR(key, web)
	chain, err := c.Sign(context.Background(), csrPEM, web.String(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	svid, err := new(sharedCerts).svid(web, key, chain)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := WriteFiles(dir, svid, []*x509.Certificate{svid.Root}); err != nil {
		t.Fatal(err)
	}
	if leaf := readLeaf(t, dir); !leaf.Equal(svid.Leaf()) {
		t.Error("cert-chain.pem does not start with the leaf")
	}
	for name, want := range map[string]os.FileMode{KeyFile: 0o600, CertChainFile: 0o644, RootCertFile: 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), want)
		}
	}
	chainPEM, _ := os.ReadFile(filepath.Join(dir, CertChainFile))
	if certs, _ := ca.ParseCertificatesPEM(chainPEM); len(certs) != len(chain)-1 {
		t.Errorf("cert-chain.pem holds %d certificates, want leaf and intermediates (%d)", len(certs), len(chain)-1)
	}
	rootPEM, _ := os.ReadFile(filepath.Join(dir, RootCertFile))
	if roots, _ := ca.ParseCertificatesPEM(rootPEM); len(roots) != 1 || !roots[0].Equal(svid.Root) {
		t.Error("root-cert.pem is not the root")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 3 {
		t.Errorf("%d files in the directory, want 3 (temporary files left?)", len(entries))
	}
	if err := WriteFiles(filepath.Join(dir, "missing"), svid, nil); err == nil {
		t.Error("writing into a missing directory succeeded")
	}
}

func TestKeepFilesRewritesOnRotation(t *testing.T) {
	dir := t.TempDir()
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m := newManager(t, c)
		h, first := holdWeb(t, m)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			KeepFiles(ctx, h, dir, func() []*x509.Certificate { return []*x509.Certificate{first.Root} }, discardLog)
			close(done)
		}()
		synctest.Wait()
		if got := readLeaf(t, dir); got.SerialNumber.Cmp(first.Leaf().SerialNumber) != 0 {
			t.Fatal("files do not hold the first certificate")
		}
		<-h.Changed()
		synctest.Wait()
		if got := readLeaf(t, dir); got.SerialNumber.Cmp(h.SVID().Leaf().SerialNumber) != 0 {
			t.Fatal("files not rewritten after rotation")
		}
		cancel()
		<-done
	})
}
