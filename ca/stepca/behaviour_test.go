package stepca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/jose"

	"github.com/meshid/meshid/internal/steptest"
)

// What step-ca itself does with meshid's requests, through this package's
// client: the behaviour the client and keys.UpstreamCA's checks rely on.

func testClient(t *testing.T, ca *steptest.CA) *Client {
	t.Helper()
	c, err := New(Config{URL: ca.URL, Roots: []*x509.Certificate{ca.Root}, Provisioner: ca.Provisioner.Name,
		Password: []byte(ca.Provisioner.Password), TrustDomain: spiffeid.RequireTrustDomainFromString(ca.TrustDomain)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// tokenFor is c's one-time token for subject, made with key (the
// provisioner's, unless a test forges one).
func tokenFor(t *testing.T, c *Client, key *jose.JSONWebKey, subject string) string {
	t.Helper()
	ott, err := c.token(key, subject)
	if err != nil {
		t.Fatal(err)
	}
	return ott
}

// requestIntermediate is meshid-ca's side: key, CSR, /1.0/sign.
func requestIntermediate(t *testing.T, c *Client) (*ecdsa.PrivateKey, []*x509.Certificate) {
	t.Helper()
	key, csr := intermediateCSR(t, "meshid intermediate CA")
	cert, chain, err := c.Sign(context.Background(), csr, time.Now().Add(48*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return key, append([]*x509.Certificate{cert}, chain...)
}

// intermediateCSR makes meshid-ca's P-256 key and a CSR with subject cn and
// no SANs (the template sets the SAN).
func intermediateCSR(t *testing.T, cn string) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, csr
}

// workload signs a leaf for id with the intermediate, as meshid-ca would.
func workload(t *testing.T, id string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		URIs:        []*url.URL{u},
		NotBefore:   parent.NotBefore,
		NotAfter:    parent.NotAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// verify checks leaf against step-ca's root through intermediates.
func verify(ca *steptest.CA, leaf *x509.Certificate, intermediates ...*x509.Certificate) error {
	pool := x509.NewCertPool()
	for _, c := range intermediates {
		pool.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         ca.RootPool(),
		Intermediates: pool,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		CurrentTime:   leaf.NotBefore.Add(time.Minute),
	})
	return err
}

var oidNameConstraints = asn1.ObjectIdentifier{2, 5, 29, 30}

// One step-ca for the subtests: each start costs a PBKDF2 of 600,000
// rounds (the provisioner key's encryption), slow under -race.
func TestStepCABehaviour(t *testing.T) {
	// Two years: more than step-ca's own intermediate lives (one year).
	ca := steptest.Start(t, steptest.Options{MaxCertDuration: 2 * 365 * 24 * time.Hour})
	c := testClient(t, ca)
	jwk, err := c.provisionerKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Run("SignsMeshIntermediate", func(t *testing.T) { testSignsMeshIntermediate(t, ca, c) })
	t.Run("RefusesTokenTwice", func(t *testing.T) { testRefusesTokenTwice(t, c, jwk) })
	t.Run("RefusesForeignKeyAndCN", func(t *testing.T) { testRefusesForeignKeyAndCN(t, ca, c, jwk) })
	t.Run("Lifetimes", func(t *testing.T) { testLifetimes(t, ca, c, jwk) })

	ca.Stop()
	if !ca.Exited() {
		t.Fatal("step-ca still running after Stop")
	}
	ca.Stop() // idempotent
}

func testSignsMeshIntermediate(t *testing.T, ca *steptest.CA, c *Client) {
	key, chain := requestIntermediate(t, c)
	got := chain[0]

	if !chain[1].Equal(ca.Intermediate) {
		t.Errorf("chain[1] is %q, want step-ca's intermediate", chain[1].Subject)
	}
	if !got.IsCA || !got.BasicConstraintsValid {
		t.Errorf("IsCA %v, BasicConstraintsValid %v; want a CA", got.IsCA, got.BasicConstraintsValid)
	}
	if got.MaxPathLen != 0 || !got.MaxPathLenZero {
		t.Errorf("MaxPathLen %d, MaxPathLenZero %v; want 0, true", got.MaxPathLen, got.MaxPathLenZero)
	}
	if got.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("KeyUsage %b, want certSign|crlSign", got.KeyUsage)
	}
	if len(got.ExtKeyUsage) != 0 {
		t.Errorf("ExtKeyUsage %v, want none", got.ExtKeyUsage)
	}
	if fmt.Sprint(got.PermittedURIDomains) != "[cluster.local]" || !got.PermittedDNSDomainsCritical {
		t.Errorf("URI name constraints %v (critical %v), want [cluster.local], critical", got.PermittedURIDomains, got.PermittedDNSDomainsCritical)
	}
	critical := false
	for _, ext := range got.Extensions {
		if ext.Id.Equal(oidNameConstraints) {
			critical = ext.Critical
		}
	}
	if !critical {
		t.Error("the name constraints extension is missing or not critical")
	}
	if len(got.URIs) != 1 || got.URIs[0].String() != "spiffe://cluster.local" || len(got.DNSNames) != 0 {
		t.Errorf("SANs URIs %v DNS %v, want only spiffe://cluster.local", got.URIs, got.DNSNames)
	}
	if got.Subject.CommonName != "meshid intermediate CA" {
		t.Errorf("subject %q", got.Subject)
	}
	if lifetime := got.NotAfter.Sub(got.NotBefore); lifetime < 48*time.Hour || lifetime > 48*time.Hour+2*time.Minute {
		t.Errorf("lifetime %s, want 48h (plus step-ca's backdate)", lifetime)
	}
	pub, ok := got.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		t.Error("the certificate is not for the CSR's key")
	}
	if err := verify(ca, got, chain[1:]...); err != nil {
		t.Errorf("the intermediate does not chain to step-ca's root: %v", err)
	}

	// What meshid-ca then issues: a workload in the trust domain verifies
	// up to step-ca's root; one outside is refused by the name constraint.
	inside := workload(t, "spiffe://cluster.local/ns/default/sa/app", got, key)
	if err := verify(ca, inside, chain...); err != nil {
		t.Errorf("workload in the trust domain: %v", err)
	}
	outside := workload(t, "spiffe://other.example/ns/default/sa/app", got, key)
	var invalid x509.CertificateInvalidError
	if err := verify(ca, outside, chain...); !errors.As(err, &invalid) || invalid.Reason != x509.CANotAuthorizedForThisName {
		t.Errorf("workload outside the trust domain: %v, want CANotAuthorizedForThisName", err)
	}
}

func testRefusesTokenTwice(t *testing.T, c *Client, jwk *jose.JSONWebKey) {
	ott := tokenFor(t, c, jwk, "meshid intermediate CA")
	_, csr := intermediateCSR(t, "meshid intermediate CA")
	if _, err := c.post(context.Background(), csr, ott, "1h"); err != nil {
		t.Fatal(err)
	}
	_, err := c.post(context.Background(), csr, ott, "1h")
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("second use of a token: %v, want 401", err)
	}
	t.Logf("step-ca's answer to a reused token: %v", err)
}

func testRefusesForeignKeyAndCN(t *testing.T, ca *steptest.CA, c *Client, jwk *jose.JSONWebKey) {
	const cn = "meshid intermediate CA"

	// A token signed by a key that is not the provisioner's.
	other, err := jose.GenerateJWK("EC", "P-256", "ES256", "sig", ca.Provisioner.KID, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, csr := intermediateCSR(t, cn)
	_, err = c.post(context.Background(), csr, tokenFor(t, c, other, cn), "1h")
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("token from a foreign key: %v, want 401", err)
	}
	t.Logf("step-ca's answer to a token from a foreign key: %v", err)

	// A CSR whose CN is not the token's subject.
	_, csr = intermediateCSR(t, "someone else")
	_, err = c.post(context.Background(), csr, tokenFor(t, c, jwk, cn), "1h")
	if err == nil || !strings.Contains(err.Error(), "403") {
		t.Errorf("CSR with another CN: %v, want 403", err)
	}
	t.Logf("step-ca's answer to a CSR with another CN: %v", err)
}

// step-ca enforces the provisioner's maximum lifetime (counting its one
// minute of backdating) but does not cap what it signs at its own
// intermediate's expiry: meshid-ca must cap its request, or check the
// answer, itself.
func testLifetimes(t *testing.T, ca *steptest.CA, c *Client, jwk *jose.JSONWebKey) {
	const cn = "meshid intermediate CA"
	request := func(lifetime time.Duration) ([]*x509.Certificate, error) {
		_, csr := intermediateCSR(t, cn)
		return c.post(context.Background(), csr, tokenFor(t, c, jwk, cn), lifetime.String())
	}

	chain, err := request(400 * 24 * time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !chain[0].NotAfter.After(ca.Intermediate.NotAfter) {
		t.Errorf("notAfter %s is within step-ca's intermediate's %s: step-ca now caps lifetimes; simplify meshid-ca's check",
			chain[0].NotAfter, ca.Intermediate.NotAfter)
	}

	_, err = request(3 * 365 * 24 * time.Hour)
	const want = "403 Forbidden: The request was forbidden by the certificate authority: requested duration of 26280h1m0s is more than the authorized maximum certificate duration of 17520h1m0s."
	if err == nil || !strings.HasSuffix(err.Error(), want) {
		t.Errorf("lifetime over the provisioner's maximum: %v, want ...%q", err, want)
	}
}

// A PKI shaped as `step ca init` makes it (root maxPathLen 1, intermediate
// maxPathLen 0): step-ca signs the sub-CA all the same, and the sub-CA
// itself verifies, but nothing it issues does. Checking the chain returned
// is not enough: meshid-ca must check that its parent leaves room for it.
func TestStepInitPKICannotCarryMeshIntermediate(t *testing.T) {
	ca := steptest.Start(t, steptest.Options{StepInitPathLens: true})
	key, chain := requestIntermediate(t, testClient(t, ca))
	if err := verify(ca, chain[0], chain[1:]...); err != nil {
		t.Fatalf("verifying the intermediate: %v", err)
	}
	if chain[1].MaxPathLen != 0 || !chain[1].MaxPathLenZero {
		t.Fatalf("step-ca's intermediate has MaxPathLen %d", chain[1].MaxPathLen)
	}
	leaf := workload(t, "spiffe://cluster.local/ns/default/sa/app", chain[0], key)
	var invalid x509.CertificateInvalidError
	if err := verify(ca, leaf, chain...); !errors.As(err, &invalid) || invalid.Reason != x509.TooManyIntermediates {
		t.Fatalf("verifying a workload: %v, want TooManyIntermediates", err)
	}
}
