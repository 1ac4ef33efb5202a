package keys_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"math/big"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

// leafUnder signs a workload-style leaf with m's intermediate directly, as
// someone holding a stolen intermediate key would, bypassing the issuer's
// own checks.
func leafUnder(t *testing.T, m *keys.Material, uri string, dns ...string) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dns,
	}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.CACert, key.Public(), m.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func goVerify(m *keys.Material, leaf *x509.Certificate) error {
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(m.RootCert)
	inter.AddCert(m.CACert)
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

// opensslVerify runs OpenSSL's chain verification, the code BoringSSL (and
// so Envoy) forked its name-constraint checks from.
func opensslVerify(t *testing.T, m *keys.Material, leaf *x509.Certificate) (string, error) {
	t.Helper()
	bin, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl not installed (.ci/run installs it)")
	}
	dir := t.TempDir()
	write := func(name string, c *x509.Certificate) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, ca.EncodePEM(c), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	out, err := exec.Command(bin, "verify", "-x509_strict", "-purpose", "sslclient",
		"-CAfile", write("root.pem", m.RootCert), "-untrusted", write("ca.pem", m.CACert),
		write("leaf.pem", leaf)).CombinedOutput()
	return string(out), err
}

func TestGeneratedRootConstrainsTrustDomain(t *testing.T) {
	for _, alg := range []keys.Algorithm{keys.ECDSAP256, keys.RSA2048} {
		t.Run(string(alg), func(t *testing.T) {
			m := generate(t, alg)
			if got := m.RootCert.PermittedURIDomains; len(got) != 1 || got[0] != "cluster.local" || !m.RootCert.PermittedDNSDomainsCritical {
				t.Fatalf("root URI constraint = %v (critical %v), want [cluster.local], critical", got, m.RootCert.PermittedDNSDomainsCritical)
			}

			// A workload of the trust domain verifies everywhere: Go,
			// go-spiffe (what pilot-agent's and Envoy's SPIFFE
			// validators build on), OpenSSL.
			own := leafUnder(t, m, "spiffe://cluster.local/ns/default/sa/web")
			if err := goVerify(m, own); err != nil {
				t.Errorf("own trust domain: %v", err)
			}
			bundle := x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{m.RootCert})
			if id, _, err := x509svid.Verify([]*x509.Certificate{own, m.CACert}, bundle); err != nil || id.String() != "spiffe://cluster.local/ns/default/sa/web" {
				t.Errorf("go-spiffe: %v, %v", id, err)
			}
			if out, err := opensslVerify(t, m, own); err != nil {
				t.Errorf("openssl refused the trust domain's own workload: %v\n%s", err, out)
			}
			// DNS names are not constrained: the CA's serving certificate.
			if err := goVerify(m, leafUnder(t, m, "spiffe://cluster.local/ns/meshid-system/sa/meshid-ca", "meshid-ca.meshid-system.svc")); err != nil {
				t.Errorf("serving certificate: %v", err)
			}

			// Another trust domain's ID, signed with this CA's key, is
			// refused by every verifier.
			foreign := leafUnder(t, m, "spiffe://prod.example/ns/default/sa/web")
			var invalid x509.CertificateInvalidError
			if err := goVerify(m, foreign); !errors.As(err, &invalid) || invalid.Reason != x509.CANotAuthorizedForThisName {
				t.Errorf("foreign trust domain: Go verify = %v, want CANotAuthorizedForThisName", err)
			}
			if out, err := opensslVerify(t, m, foreign); err == nil || !strings.Contains(out, "subtree") {
				t.Errorf("openssl accepted another trust domain's ID: %v\n%s", err, out)
			}
		})
	}
}

func TestRotationRootKeepsTheConstraint(t *testing.T) {
	m := generate(t, keys.ECDSAP256)
	next, err := m.PrepareRotation(keys.ECDSAP256, keys.DefaultRootTTL, keys.DefaultIntermediateTTL, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if got := next.Rotation.NextRoot.PermittedURIDomains; len(got) != 1 || got[0] != "cluster.local" {
		t.Errorf("next root URI constraint = %v, want [cluster.local]", got)
	}
}
