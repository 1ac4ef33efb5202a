package keys_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

func generate(t testing.TB, alg keys.Algorithm) *keys.Material {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local", Algorithm: alg})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestGenerateAlgorithms(t *testing.T) {
	if testing.Short() {
		t.Skip("RSA-4096 generation is slow")
	}
	for _, alg := range keys.Algorithms {
		t.Run(string(alg), func(t *testing.T) {
			m := generate(t, alg)
			is, err := m.Issuer(time.Now())
			if err != nil {
				t.Fatal(err)
			}
			if !m.RootCert.IsCA || !m.CACert.IsCA || !m.CACert.MaxPathLenZero {
				t.Error("root and intermediate must be CAs, the intermediate with pathlen 0")
			}
			if got := is.Root().NotAfter.Sub(is.Root().NotBefore); got < keys.DefaultRootTTL {
				t.Errorf("root lives %s, want at least %s", got, keys.DefaultRootTTL)
			}
		})
	}
}

func TestStateDirCreatesOnceAndReuses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	calls := 0
	create := func() (*keys.Material, error) { calls++; return generate(t, keys.ECDSAP256), nil }

	d, err := keys.OpenStateDir(path)
	if err != nil {
		t.Fatal(err)
	}
	first, created, err := d.LoadOrCreate(create)
	if err != nil || !created {
		t.Fatalf("first start: created=%v err=%v", created, err)
	}
	d.Close()

	d, err = keys.OpenStateDir(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	again, created, err := d.LoadOrCreate(create)
	if err != nil || created || calls != 1 {
		t.Fatalf("restart: created=%v calls=%d err=%v", created, calls, err)
	}
	if !again.RootCert.Equal(first.RootCert) || !again.CACert.Equal(first.CACert) {
		t.Error("restart produced a different CA")
	}
	for name, want := range map[string]os.FileMode{
		"ca/ca-key.pem":   0o600,
		"ca/root-key.pem": 0o600,
		"ca/ca-cert.pem":  0o644,
		"ca":              0o700 | os.ModeDir,
		"":                0o700 | os.ModeDir,
	} {
		fi, err := os.Stat(filepath.Join(path, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", name, fi.Mode(), want)
		}
	}
}

func TestStateDirIsExclusive(t *testing.T) {
	path := t.TempDir()
	d, err := keys.OpenStateDir(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := keys.OpenStateDir(path); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Errorf("second open: err = %v", err)
	}
}

func TestStateDirRefusesDamagedState(t *testing.T) {
	path := t.TempDir()
	d, _ := keys.OpenStateDir(path)
	if _, _, err := d.LoadOrCreate(func() (*keys.Material, error) { return generate(t, keys.ECDSAP256), nil }); err != nil {
		t.Fatal(err)
	}
	d.Close()
	os.Remove(filepath.Join(path, "ca", "ca-key.pem"))
	d, _ = keys.OpenStateDir(path)
	defer d.Close()
	_, _, err := d.LoadOrCreate(func() (*keys.Material, error) {
		t.Fatal("regenerated over damaged state")
		return nil, nil
	})
	if err == nil || !strings.Contains(err.Error(), "ca-key.pem") {
		t.Errorf("err = %v, want a message naming ca-key.pem", err)
	}
}

func files(t testing.TB, m *keys.Material) map[string][]byte {
	t.Helper()
	f, err := m.Files()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestParseFilesRoundTrip(t *testing.T) {
	m := generate(t, keys.RSA2048)
	got, err := keys.ParseFiles(files(t, m))
	if err != nil {
		t.Fatal(err)
	}
	if !got.CACert.Equal(m.CACert) || !got.RootCert.Equal(m.RootCert) || len(got.Chain) != 0 || len(got.Roots) != 1 {
		t.Errorf("round trip changed the material: chain %d roots %d", len(got.Chain), len(got.Roots))
	}
}

func TestParseFilesRefuses(t *testing.T) {
	m := generate(t, keys.ECDSAP256)
	other := generate(t, keys.ECDSAP256)
	for _, tc := range []struct {
		name    string
		edit    func(map[string][]byte)
		wantErr string
	}{
		{name: "key of another CA", edit: func(f map[string][]byte) { f[keys.CAKeyFile] = files(t, other)[keys.CAKeyFile] }, wantErr: "ca-key.pem does not match the certificate in ca-cert.pem"},
		{name: "missing key", edit: func(f map[string][]byte) { delete(f, keys.CAKeyFile) }, wantErr: "ca-key.pem: file does not exist"},
		{name: "garbage cert", edit: func(f map[string][]byte) { f[keys.CACertFile] = []byte("nope") }, wantErr: "ca-cert.pem"},
		{name: "encrypted key", edit: func(f map[string][]byte) {
			f[keys.CAKeyFile] = []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
		}, wantErr: "encrypted private keys are not supported"},
		{name: "root key of another root", edit: func(f map[string][]byte) { f[keys.RootKeyFile] = files(t, other)[keys.RootKeyFile] }, wantErr: "root-key.pem matches no certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := files(t, m)
			tc.edit(f)
			_, err := keys.ParseFiles(f)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// pluginFiles writes m as an operator would for Istio: no root key.
func writePlugin(t testing.TB, dir string, m *keys.Material) {
	t.Helper()
	for name, data := range files(t, m) {
		if name == keys.RootKeyFile {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPluginLoad(t *testing.T) {
	dir := t.TempDir()
	m := generate(t, keys.ECDSAP256)
	writePlugin(t, dir, m)
	is, err := (&keys.Plugin{Dir: dir}).Load()
	if err != nil {
		t.Fatal(err)
	}
	if !is.Certificate().Equal(m.CACert) {
		t.Error("loaded another CA certificate")
	}

	t.Run("chain that does not verify", func(t *testing.T) {
		other := generate(t, keys.ECDSAP256)
		os.WriteFile(filepath.Join(dir, keys.RootCertFile), ca.EncodePEM(other.RootCert), 0o600)
		os.WriteFile(filepath.Join(dir, keys.CertChainFile), ca.EncodePEM(m.CACert), 0o600)
		_, err := (&keys.Plugin{Dir: dir}).Load()
		if err == nil || !strings.Contains(err.Error(), "does not chain to the trust bundle") {
			t.Errorf("err = %v", err)
		}
	})

	t.Run("cert-chain.pem of another CA", func(t *testing.T) {
		other := generate(t, keys.ECDSAP256)
		for name, chain := range map[string][]byte{
			"does not start with": append(ca.EncodePEM(other.CACert), ca.EncodePEM(other.RootCert)...),
			"is not issued by":    append(ca.EncodePEM(m.CACert), ca.EncodePEM(other.RootCert)...),
		} {
			d := t.TempDir()
			writePlugin(t, d, m)
			os.WriteFile(filepath.Join(d, keys.CertChainFile), chain, 0o600)
			_, err := (&keys.Plugin{Dir: d}).Load()
			if err == nil || !strings.Contains(err.Error(), name) {
				t.Errorf("want %q: err = %v", name, err)
			}
		}
	})
}

func TestPluginWatchReloadsAndKeepsGoodCA(t *testing.T) {
	dir := t.TempDir()
	first := generate(t, keys.ECDSAP256)
	writePlugin(t, dir, first)
	p := &keys.Plugin{Dir: dir}
	is, err := p.Load()
	if err != nil {
		t.Fatal(err)
	}
	var src keys.Source
	src.Set(is)
	// Each result comes with the CA current when the watcher reported it.
	// Reading the CA when the test gets round to a result would be wrong:
	// the channel is buffered, and by then a later reload may have
	// succeeded.
	type outcome struct {
		err     error
		current *x509.Certificate
	}
	results := make(chan outcome, 16)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go p.Watch(ctx, &src, 10*time.Millisecond, discardLogger(), func(err error) {
		results <- outcome{err, src.Issuer().Certificate()}
	})
	next := func() outcome {
		t.Helper()
		select {
		case o := <-results:
			return o
		case <-time.After(10 * time.Second):
			t.Fatal("the watcher did not try to reload within 10s")
			return outcome{}
		}
	}

	// A key that does not match: refused, the first CA keeps signing. The
	// watcher may also see the file half written: refused too, never loaded.
	other := generate(t, keys.ECDSAP256)
	os.WriteFile(filepath.Join(dir, keys.CAKeyFile), files(t, other)[keys.CAKeyFile], 0o600)
	for {
		o := next()
		if o.err == nil {
			t.Fatal("a CA whose key does not match its certificate was loaded")
		}
		if !o.current.Equal(first.CACert) {
			t.Fatal("a bad reload replaced the CA")
		}
		if strings.Contains(o.err.Error(), "does not match") {
			break
		}
	}

	// A whole new CA, its files written one by one: the mixes seen on the
	// way are refused, and the complete new CA is picked up.
	writePlugin(t, dir, other)
	for {
		o := next()
		if o.err == nil {
			if !o.current.Equal(other.CACert) {
				t.Fatal("the new CA is not current after a reload that succeeded")
			}
			break
		}
		if !o.current.Equal(first.CACert) {
			t.Fatal("a failed reload replaced the CA")
		}
	}
}

func TestSecretCreatesThenReuses(t *testing.T) {
	client := fake.NewClientset()
	s := &keys.Secret{Client: client.CoreV1(), Namespace: "meshid-system", Name: "meshid-ca"}
	ctx := context.Background()
	first, created, err := s.LoadOrCreate(ctx, func() (*keys.Material, error) { return generate(t, keys.ECDSAP256), nil })
	if err != nil || !created {
		t.Fatalf("created=%v err=%v", created, err)
	}
	again, created, err := s.LoadOrCreate(ctx, func() (*keys.Material, error) { return generate(t, keys.ECDSAP256), nil })
	if err != nil || created || !again.RootCert.Equal(first.RootCert) {
		t.Fatalf("second load: created=%v err=%v", created, err)
	}
}

func TestSecretConcurrentStartsConverge(t *testing.T) {
	client := fake.NewClientset()
	ctx := context.Background()
	var wg sync.WaitGroup
	roots := make([]*x509.Certificate, 4)
	for i := range roots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := &keys.Secret{Client: client.CoreV1(), Namespace: "ns", Name: "meshid-ca"}
			m, _, err := s.LoadOrCreate(ctx, func() (*keys.Material, error) { return generate(t, keys.ECDSAP256), nil })
			if err != nil {
				t.Error(err)
				return
			}
			roots[i] = m.RootCert
		}()
	}
	wg.Wait()
	for _, r := range roots[1:] {
		if r == nil || !r.Equal(roots[0]) {
			t.Fatal("replicas ended with different roots")
		}
	}
}
