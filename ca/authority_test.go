package ca_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

var (
	td        = spiffeid.RequireTrustDomainFromString("cluster.local")
	webID     = spiffeid.RequireFromPath(td, "/ns/demo/sa/web")
	t0        = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	oidSAN    = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidKeyUse = asn1.ObjectIdentifier{2, 5, 29, 15}
)

type fixedSource struct{ is *ca.Issuer }

type keysSigner = crypto.Signer

func (f fixedSource) Issuer() *ca.Issuer { return f.is }

func newIssuer(t testing.TB, opts keys.Options) (*ca.Issuer, *keys.Material) {
	t.Helper()
	if opts.Now.IsZero() {
		opts.Now = t0
	}
	opts.TrustDomain = "cluster.local"
	m, err := keys.Generate(opts)
	if err != nil {
		t.Fatal(err)
	}
	is, err := m.Issuer(opts.Now)
	if err != nil {
		t.Fatal(err)
	}
	return is, m
}

func newAuthority(t testing.TB, is *ca.Issuer, now time.Time) *ca.Authority {
	t.Helper()
	a, err := ca.New(ca.Config{Issuers: fixedSource{is}, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func ecKey(t testing.TB) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestIssueLeafShape(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	now := t0.Add(time.Hour)
	a := newAuthority(t, is, now)
	key := ecKey(t)
	cert, err := a.Issue(ca.Request{ID: webID, PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != webID.String() {
		t.Errorf("URIs = %v, want [%s]", leaf.URIs, webID)
	}
	if len(leaf.Subject.Names) != 0 {
		t.Errorf("subject = %q, want empty", leaf.Subject)
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		t.Error("leaf must be CA:FALSE with basicConstraints present")
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage = %v, want DigitalSignature only for an EC key", leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ExtKeyUsage = %v, want serverAuth, clientAuth", leaf.ExtKeyUsage)
	}
	for _, ext := range leaf.Extensions {
		if (ext.Id.Equal(oidSAN) || ext.Id.Equal(oidKeyUse)) && !ext.Critical {
			t.Errorf("extension %v must be critical", ext.Id)
		}
	}
	if string(leaf.AuthorityKeyId) != string(is.Certificate().SubjectKeyId) || len(leaf.AuthorityKeyId) == 0 {
		t.Error("AKI must equal the intermediate's SKI")
	}
	if got, want := leaf.NotBefore, now.Add(-ca.DefaultBackdate); !got.Equal(want) {
		t.Errorf("NotBefore = %s, want %s (backdated)", got, want)
	}
	if got, want := leaf.NotAfter, now.Add(ca.DefaultTTL); !got.Equal(want) {
		t.Errorf("NotAfter = %s, want %s", got, want)
	}
	if leaf.SerialNumber.BitLen() < 64 {
		t.Errorf("serial %x looks too small to be random", leaf.SerialNumber)
	}

	// Leaf first, root last; the chain verifies with go-spiffe.
	if len(cert.ChainPEM) != 3 {
		t.Fatalf("chain has %d elements, want leaf, intermediate, root", len(cert.ChainPEM))
	}
	var chain []*x509.Certificate
	for _, p := range cert.ChainPEM {
		c, err := ca.ParseCertificatesPEM([]byte(p))
		if err != nil || len(c) != 1 {
			t.Fatalf("chain element is not one PEM certificate: %v", err)
		}
		chain = append(chain, c[0])
	}
	if !chain[2].Equal(is.Root()) || !chain[1].Equal(is.Certificate()) {
		t.Error("chain is not leaf, intermediate, root")
	}
	bundle := x509bundle.FromX509Authorities(td, is.Roots())
	id, _, err := x509svid.Verify(chain[:2], bundle, x509svid.WithTime(now))
	if err != nil || id != webID {
		t.Fatalf("x509svid.Verify = %v, %v", id, err)
	}
}

func TestIssueRSAKeyAddsKeyEncipherment(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := newAuthority(t, is, t0).Issue(ca.Request{ID: webID, PublicKey: rk.Public()})
	if err != nil {
		t.Fatal(err)
	}
	if want := x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment; cert.Leaf.KeyUsage != want {
		t.Errorf("KeyUsage = %v, want %v", cert.Leaf.KeyUsage, want)
	}
}

func TestIssueTTL(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{IntermediateTTL: 48 * time.Hour})
	now := t0.Add(time.Hour)
	a := newAuthority(t, is, now)
	key := ecKey(t)
	for _, tc := range []struct {
		name    string
		ttl     time.Duration
		want    time.Time
		wantErr bool
	}{
		{name: "zero takes the default", ttl: 0, want: now.Add(time.Hour)},
		{name: "asked", ttl: 2 * time.Hour, want: now.Add(2 * time.Hour)},
		{name: "huge is clamped to the max", ttl: 1 << 62, want: now.Add(24 * time.Hour)},
		{name: "negative is refused", ttl: -time.Second, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := a.Issue(ca.Request{ID: webID, PublicKey: key.Public(), TTL: tc.ttl})
			if tc.wantErr {
				if !errors.Is(err, ca.ErrInvalidRequest) {
					t.Fatalf("err = %v, want ErrInvalidRequest", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !cert.Leaf.NotAfter.Equal(tc.want) {
				t.Errorf("NotAfter = %s, want %s", cert.Leaf.NotAfter, tc.want)
			}
		})
	}
}

func TestIssueNeverOutlivesIssuer(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{IntermediateTTL: 2 * time.Hour})
	now := t0.Add(90 * time.Minute) // 30 minutes before the intermediate expires
	cert, err := newAuthority(t, is, now).Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !cert.Leaf.NotAfter.Equal(is.NotAfter()) {
		t.Errorf("NotAfter = %s, want the issuer's %s", cert.Leaf.NotAfter, is.NotAfter())
	}
	_, err = newAuthority(t, is, t0.Add(3*time.Hour)).Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public()})
	if err == nil || !strings.Contains(err.Error(), "issuer expired") {
		t.Errorf("after the issuer expired: err = %v, want issuer expired", err)
	}
}

func TestIssueNotBeforeNotBeforeIssuer(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	// Right after the CA was made, backdating must not reach before it.
	now := is.Certificate().NotBefore.Add(time.Second)
	cert, err := newAuthority(t, is, now).Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public()})
	if err != nil {
		t.Fatal(err)
	}
	if cert.Leaf.NotBefore.Before(is.Certificate().NotBefore) {
		t.Errorf("NotBefore %s precedes the issuer's %s", cert.Leaf.NotBefore, is.Certificate().NotBefore)
	}
}

func TestIssueWithoutIssuer(t *testing.T) {
	a, err := ca.New(ca.Config{Issuers: fixedSource{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public()}); !errors.Is(err, ca.ErrNoIssuer) {
		t.Errorf("err = %v, want ErrNoIssuer", err)
	}
}

func TestIssueServing(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	cert, err := newAuthority(t, is, t0).IssueServing(ecKey(t).Public(), []string{"meshid-ca.meshid-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.Leaf.URIs) != 0 || cert.Leaf.DNSNames[0] != "meshid-ca.meshid-system.svc" {
		t.Errorf("names = %v %v", cert.Leaf.URIs, cert.Leaf.DNSNames)
	}
}

func TestNewConfigChecks(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	for _, cfg := range []ca.Config{
		{},
		{Issuers: fixedSource{is}, DefaultTTL: 48 * time.Hour},
		{Issuers: fixedSource{is}, Backdate: -time.Second},
	} {
		if _, err := ca.New(cfg); err == nil {
			t.Errorf("New(%+v) accepted a bad config", cfg)
		}
	}
}

// During a root rotation the CA trusts two roots; the answer's last element
// must carry both, as istiod's does, with the root the chain ends in first.
func TestIssueChainCarriesEveryRoot(t *testing.T) {
	_, old := newIssuer(t, keys.Options{})
	_, cur := newIssuer(t, keys.Options{})
	for name, bundle := range map[string][]*x509.Certificate{
		"signing root listed second": {old.RootCert, cur.RootCert},
		"signing root listed first":  {cur.RootCert, old.RootCert},
	} {
		t.Run(name, func(t *testing.T) {
			is, err := ca.NewIssuer(cur.CACert, cur.CAKey, cur.Chain, bundle, t0)
			if err != nil {
				t.Fatal(err)
			}
			cert, err := newAuthority(t, is, t0).Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public()})
			if err != nil {
				t.Fatal(err)
			}
			if len(cert.ChainPEM) != 3 {
				t.Fatalf("chain has %d elements, want leaf, intermediate, roots", len(cert.ChainPEM))
			}
			for i, p := range cert.ChainPEM[:2] {
				if c, err := ca.ParseCertificatesPEM([]byte(p)); err != nil || len(c) != 1 {
					t.Errorf("element %d is not one PEM certificate: %d, %v", i, len(c), err)
				}
			}
			roots, err := ca.ParseCertificatesPEM([]byte(cert.ChainPEM[2]))
			if err != nil {
				t.Fatal(err)
			}
			if len(roots) != 2 || !roots[0].Equal(cur.RootCert) || !roots[1].Equal(old.RootCert) {
				t.Fatalf("last element holds %d roots, want the signing root then the old one", len(roots))
			}
			if err := cur.CACert.CheckSignatureFrom(roots[0]); err != nil {
				t.Errorf("first root of the last element did not sign the intermediate: %v", err)
			}
		})
	}
}

// With one root the answer is what it always was: one PEM certificate per
// element, leaf, the issuer's chain, root last.
func TestIssueChainOneRootUnchanged(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	cert, err := newAuthority(t, is, t0).Issue(ca.Request{ID: webID, PublicKey: ecKey(t).Public()})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{string(ca.EncodePEM(cert.Leaf))}
	for _, c := range is.Chain() {
		want = append(want, string(ca.EncodePEM(c)))
	}
	if !slices.Equal(cert.ChainPEM, want) {
		t.Errorf("ChainPEM = %q, want %q", cert.ChainPEM, want)
	}
	if got := cert.ChainPEM[len(cert.ChainPEM)-1]; got != string(is.RootsPEM()) {
		t.Errorf("last element = %q, want the trust bundle %q", got, is.RootsPEM())
	}
}

// TestSerialsSortByIssueTime: serials are unique, positive, at most 20
// octets, carry 80 random bits (two in the same millisecond differ), and
// sort by issue time as the ledger stores them (lower-case hex), so its
// serial index grows at one end.
func TestSerialsSortByIssueTime(t *testing.T) {
	is, _ := newIssuer(t, keys.Options{})
	key := ecKey(t)
	var prev string
	seen := map[string]bool{}
	for i, at := range []time.Duration{time.Hour, time.Hour, time.Hour + time.Millisecond, time.Hour + 2*time.Second, 3 * time.Hour} {
		cert, err := newAuthority(t, is, t0.Add(at)).Issue(ca.Request{ID: webID, PublicKey: key.Public()})
		if err != nil {
			t.Fatal(err)
		}
		sn := cert.Leaf.SerialNumber
		if sn.Sign() <= 0 || len(sn.Bytes()) > 20 {
			t.Fatalf("serial %x: not a positive number of at most 20 octets", sn)
		}
		hex := fmt.Sprintf("%x", sn)
		if seen[hex] {
			t.Fatalf("serial %s issued twice", hex)
		}
		seen[hex] = true
		if i > 0 && at != time.Hour && (len(hex) != len(prev) || hex <= prev) {
			t.Errorf("serial %s issued after %s sorts before it", hex, prev)
		}
		prev = hex
	}
}
