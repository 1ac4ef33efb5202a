package agent

import (
	"crypto"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

// rotatingCA is a CA in the middle of a root rotation: it signs under cur
// and trusts old as well.
type rotatingCA struct {
	old, cur *keys.Material
}

func newRotatingCA(t testing.TB) rotatingCA {
	t.Helper()
	var ms [2]*keys.Material
	for i := range ms {
		m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
		if err != nil {
			t.Fatal(err)
		}
		ms[i] = m
	}
	return rotatingCA{old: ms[0], cur: ms[1]}
}

// issue signs a certificate for web and key with r.cur's intermediate, or
// with its root directly when signing is that root, trusting roots.
func (r rotatingCA) issue(t testing.TB, key crypto.Signer, signing *x509.Certificate, roots ...*x509.Certificate) *ca.Certificate {
	t.Helper()
	m := r.cur
	cert, signer, inter := m.CACert, m.CAKey, m.Chain
	if signing == m.RootCert {
		cert, signer, inter = m.RootCert, m.RootKey, nil
	}
	is, err := ca.NewIssuer(cert, signer, inter, roots, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{Issuers: fixedIssuer{is}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := a.Issue(ca.Request{ID: web, PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type fixedIssuer struct{ is *ca.Issuer }

func (f fixedIssuer) Issuer() *ca.Issuer { return f.is }

func pemOf(certs ...*x509.Certificate) string {
	var s string
	for _, c := range certs {
		s += string(ca.EncodePEM(c))
	}
	return s
}

func TestParseChainPicksTheIssuingRoot(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	for name, roots := range map[string][]*x509.Certificate{
		"one root":                    {r.cur.RootCert},
		"signing root first":          {r.cur.RootCert, r.old.RootCert},
		"signing root second":         {r.old.RootCert, r.cur.RootCert},
		"signing root between others": {r.old.RootCert, r.cur.RootCert, newRotatingCA(t).old.RootCert},
	} {
		t.Run(name, func(t *testing.T) {
			leaf := r.issue(t, key, r.cur.CACert, r.cur.RootCert).Leaf
			// The last element as the CA wrote it, in the order given.
			chain, err := ParseChain([]string{pemOf(leaf), pemOf(r.cur.CACert), pemOf(roots...)})
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != 3 || !chain[0].Equal(leaf) || !chain[1].Equal(r.cur.CACert) || !chain[2].Equal(r.cur.RootCert) {
				t.Fatalf("chain of %d is not leaf, intermediate, signing root", len(chain))
			}
			svid, err := new(sharedCerts).svid(web, key, chain)
			if err != nil {
				t.Fatal(err)
			}
			if !svid.Root.Equal(r.cur.RootCert) {
				t.Error("SVID's root is not the signing root")
			}
		})
	}
}

func TestParseChainFromTheCA(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	for name, signing := range map[string]*x509.Certificate{
		"intermediate signs": r.cur.CACert,
		"root signs":         r.cur.RootCert,
	} {
		t.Run(name, func(t *testing.T) {
			cert := r.issue(t, key, signing, r.old.RootCert, r.cur.RootCert)
			chain, err := ParseChain(cert.ChainPEM)
			if err != nil {
				t.Fatal(err)
			}
			if got := chain[len(chain)-1]; !got.Equal(r.cur.RootCert) {
				t.Errorf("chain ends in %q, want the signing root", got.Subject)
			}
			if len(chain) != len(cert.ChainPEM) {
				t.Errorf("chain of %d for %d elements: the other root was kept", len(chain), len(cert.ChainPEM))
			}
			if _, err := new(sharedCerts).svid(web, key, chain); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestParseChainRefusesRootsThatDidNotIssue(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	leaf := r.issue(t, key, r.cur.CACert, r.cur.RootCert).Leaf
	other := newRotatingCA(t)
	_, err := ParseChain([]string{pemOf(leaf), pemOf(r.cur.CACert), pemOf(r.old.RootCert, other.old.RootCert)})
	if err == nil || !strings.Contains(err.Error(), "none of the 2 roots the CA sent issued") {
		t.Fatalf("err = %v, want none of the roots issued", err)
	}
	for name, in := range map[string][]string{
		"one element":   {pemOf(leaf)},
		"roots not PEM": {pemOf(leaf), pemOf(r.cur.CACert), "junk"},
		"empty roots":   {pemOf(leaf), pemOf(r.cur.CACert), ""},
	} {
		if _, err := ParseChain(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A Signer may hand the manager a flattened answer: every root at the end.
func TestSVIDFromFlattenedRoots(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	other := newRotatingCA(t)
	withInter := r.issue(t, key, r.cur.CACert, r.cur.RootCert).Leaf
	direct := r.issue(t, key, r.cur.RootCert, r.cur.RootCert).Leaf
	for name, tc := range map[string]struct {
		chain   []*x509.Certificate
		wantErr string
	}{
		"signing root first":  {chain: []*x509.Certificate{withInter, r.cur.CACert, r.cur.RootCert, r.old.RootCert}},
		"signing root second": {chain: []*x509.Certificate{withInter, r.cur.CACert, r.old.RootCert, r.cur.RootCert}},
		"root signs, first":   {chain: []*x509.Certificate{direct, r.cur.RootCert, r.old.RootCert}},
		"root signs, second":  {chain: []*x509.Certificate{direct, r.old.RootCert, r.cur.RootCert}},
		"no root issued":      {chain: []*x509.Certificate{withInter, r.cur.CACert, r.old.RootCert, other.cur.RootCert}, wantErr: "none of the 2 roots"},
		"lone wrong root":     {chain: []*x509.Certificate{withInter, r.cur.CACert, r.old.RootCert}, wantErr: "does not verify"},
	} {
		t.Run(name, func(t *testing.T) {
			svid, err := new(sharedCerts).svid(web, key, tc.chain)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !svid.Root.Equal(r.cur.RootCert) {
				t.Error("SVID's root is not the signing root")
			}
			inter := svid.Certificates()[1:]
			if want := tc.chain[1 : len(tc.chain)-2]; len(inter) != len(want) {
				t.Errorf("%d intermediates served, want %d: roots must not be served as intermediates", len(inter), len(want))
			}
		})
	}
}

// FuzzParseChain: any answer gives a chain or an error, never a panic, and a
// chain always ends in a root that issued the certificate before it. The
// elements of an answer are joined by NUL, which PEM never holds.
func FuzzParseChain(f *testing.F) {
	r := newRotatingCA(f)
	key, _ := NewKey(ECDSAP256)
	for _, signing := range []*x509.Certificate{r.cur.CACert, r.cur.RootCert} {
		cert := r.issue(f, key, signing, r.old.RootCert, r.cur.RootCert)
		f.Add(strings.Join(cert.ChainPEM, "\x00"))
	}
	leaf := r.issue(f, key, r.cur.CACert, r.cur.RootCert).Leaf
	f.Add(strings.Join([]string{pemOf(leaf), pemOf(r.cur.CACert), pemOf(r.old.RootCert)}, "\x00"))
	f.Add(strings.Join([]string{pemOf(leaf), pemOf(r.cur.CACert, r.cur.RootCert)}, "\x00"))
	f.Fuzz(func(t *testing.T, answer string) {
		chain, err := ParseChain(strings.Split(answer, "\x00"))
		if err != nil {
			return
		}
		if len(chain) < 2 {
			t.Fatalf("chain of %d accepted", len(chain))
		}
		if err := chain[len(chain)-2].CheckSignatureFrom(chain[len(chain)-1]); err != nil {
			t.Fatalf("chain ends in a root that did not issue the certificate before it: %v", err)
		}
	})
}
