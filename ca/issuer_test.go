package ca_test

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

func TestNewIssuerRefusesBadMaterial(t *testing.T) {
	_, m := newIssuer(t, keys.Options{})
	_, other := newIssuer(t, keys.Options{})
	for _, tc := range []struct {
		name    string
		cert    *x509.Certificate
		key     any
		inter   []*x509.Certificate
		roots   []*x509.Certificate
		now     time.Time
		wantErr string
	}{
		{name: "key of another CA", cert: m.CACert, key: other.CAKey, roots: m.Roots, now: t0, wantErr: "does not match"},
		{name: "root of another CA", cert: m.CACert, key: m.CAKey, roots: other.Roots, now: t0, wantErr: "does not chain"},
		{name: "empty bundle", cert: m.CACert, key: m.CAKey, now: t0, wantErr: "trust bundle is empty"},
		{name: "expired", cert: m.CACert, key: m.CAKey, roots: m.Roots, now: t0.Add(2 * 365 * 24 * time.Hour), wantErr: "does not chain"},
		{name: "not yet valid", cert: m.CACert, key: m.CAKey, roots: m.Roots, now: t0.Add(-time.Hour), wantErr: "does not chain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ca.NewIssuer(tc.cert, tc.key.(keysSigner), tc.inter, tc.roots, tc.now)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("err = %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestNewIssuerRefusesLeafAsCA(t *testing.T) {
	is, m := newIssuer(t, keys.Options{})
	key := ecKey(t)
	leaf, err := newAuthority(t, is, t0).Issue(ca.Request{ID: webID, PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ca.NewIssuer(leaf.Leaf, key, []*x509.Certificate{m.CACert}, m.Roots, t0)
	if err == nil || !strings.Contains(err.Error(), "is not a CA") {
		t.Errorf("err = %v, want is not a CA", err)
	}
}

func TestIssuerSignedByRootDirectly(t *testing.T) {
	_, m := newIssuer(t, keys.Options{})
	is, err := ca.NewIssuer(m.RootCert, m.RootKey, nil, m.Roots, t0)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := newAuthority(t, is, t0).Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public()})
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.ChainPEM) != 2 {
		t.Errorf("chain has %d elements, want leaf and root (Istio needs at least 2)", len(cert.ChainPEM))
	}
}

func TestParseCertificatesPEM(t *testing.T) {
	_, m := newIssuer(t, keys.Options{})
	good := string(ca.EncodePEM(m.CACert)) + "\n" + string(ca.EncodePEM(m.RootCert))
	if certs, err := ca.ParseCertificatesPEM([]byte(good)); err != nil || len(certs) != 2 {
		t.Fatalf("ParseCertificatesPEM(two certs) = %d, %v", len(certs), err)
	}
	for name, in := range map[string]string{
		"empty":         "",
		"not PEM":       "hello",
		"trailing junk": good + "junk",
		"other block":   "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
		"truncated DER": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
	} {
		if _, err := ca.ParseCertificatesPEM([]byte(in)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
