package steptest_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"go.step.sm/crypto/jose"

	"github.com/meshid/meshid/internal/steptest"
)

// The client side of --ca-source=step as the tests prove it: step-ca's HTTP
// API spoken directly, with a one-time token made with go.step.sm/crypto/jose
// (docs/step-ca-notes.md says why not smallstep's ca package).

// provisionerKey fetches the JWK provisioner's encrypted private key from
// step-ca and decrypts it with the password.
func provisionerKey(c *http.Client, caURL, kid, password string) (*jose.JSONWebKey, error) {
	resp, err := c.Get(caURL + "/1.0/provisioners/" + url.PathEscape(kid) + "/encrypted-key")
	if err != nil {
		return nil, err
	}
	var body struct {
		Key string `json:"key"`
	}
	if err := decode(resp, &body); err != nil {
		return nil, fmt.Errorf("provisioner key %s: %w", kid, err)
	}
	plain, err := jose.Decrypt([]byte(body.Key), jose.WithPassword([]byte(password)))
	if err != nil {
		return nil, fmt.Errorf("provisioner key %s: %w", kid, err)
	}
	var jwk jose.JSONWebKey
	if err := json.Unmarshal(plain, &jwk); err != nil {
		return nil, fmt.Errorf("provisioner key %s: %w", kid, err)
	}
	return &jwk, nil
}

// token makes a JWK provisioner's one-time token for /1.0/sign, with the
// claims step's own client sets: iss = provisioner name, kid header, aud =
// the sign URL, sub, sans, a random jti (step-ca refuses a jti twice), and
// five minutes of validity.
func token(key *jose.JSONWebKey, provisioner, caURL, subject string, sans []string, now time.Time) (string, error) {
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.SignatureAlgorithm(key.Algorithm), Key: key.Key},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", key.KeyID))
	if err != nil {
		return "", err
	}
	jti := make([]byte, 32)
	rand.Read(jti)
	claims := jose.Claims{
		ID:        hex.EncodeToString(jti),
		Issuer:    provisioner,
		Subject:   subject,
		Audience:  jose.Audience{caURL + "/1.0/sign"},
		NotBefore: jose.NewNumericDate(now),
		IssuedAt:  jose.NewNumericDate(now),
		Expiry:    jose.NewNumericDate(now.Add(5 * time.Minute)),
	}
	return jose.Signed(signer).Claims(claims).Claims(map[string]any{"sans": sans}).Serialize()
}

// signResponse is step-ca's answer to /1.0/sign (api.SignResponse).
type signResponse struct {
	Crt       string   `json:"crt"`
	CA        string   `json:"ca"`
	CertChain []string `json:"certChain"`
}

// sign posts a CSR with its token to /1.0/sign and returns the chain,
// leaf first.
func sign(c *http.Client, caURL string, csrDER []byte, ott string, lifetime time.Duration) ([]*x509.Certificate, error) {
	req, err := json.Marshal(map[string]string{
		"csr":      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		"ott":      ott,
		"notAfter": lifetime.String(),
	})
	if err != nil {
		return nil, err
	}
	resp, err := c.Post(caURL+"/1.0/sign", "application/json", bytes.NewReader(req))
	if err != nil {
		return nil, err
	}
	var body signResponse
	if err := decode(resp, &body); err != nil {
		return nil, fmt.Errorf("step-ca sign: %w", err)
	}
	var chain []*x509.Certificate
	for _, p := range body.CertChain {
		block, _ := pem.Decode([]byte(p))
		if block == nil {
			return nil, errors.New("step-ca sign: a certChain entry is not PEM")
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("step-ca sign: %w", err)
		}
		chain = append(chain, cert)
	}
	if len(chain) < 2 {
		return nil, fmt.Errorf("step-ca sign: a chain of %d certificates, want the leaf and step-ca's intermediate", len(chain))
	}
	return chain, nil
}

// decode reads a JSON answer, or step-ca's error body {"status","message"}.
func decode(resp *http.Response, v any) error {
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 { // /1.0/sign answers 201
		var e struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(b, &e) == nil && e.Message != "" {
			return fmt.Errorf("%s: %s", resp.Status, e.Message)
		}
		return fmt.Errorf("%s: %.200q", resp.Status, b)
	}
	return json.Unmarshal(b, v)
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

// requestIntermediate is meshid-ca's side: key, CSR, token, /1.0/sign.
func requestIntermediate(t *testing.T, ca *steptest.CA, jwk *jose.JSONWebKey) (*ecdsa.PrivateKey, []*x509.Certificate) {
	t.Helper()
	client := ca.HTTPClient()
	const cn = "meshid intermediate CA"
	spiffeID := "spiffe://" + ca.TrustDomain
	ott, err := token(jwk, ca.Provisioner.Name, ca.URL, cn, []string{spiffeID}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	key, csr := intermediateCSR(t, cn)
	chain, err := sign(client, ca.URL, csr, ott, 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return key, chain
}

// One step-ca for the subtests: each start costs a PBKDF2 of 600,000
// rounds (the provisioner key's encryption), slow under -race.
func TestStepCA(t *testing.T) {
	// Two years: more than step-ca's own intermediate lives (one year).
	ca := steptest.Start(t, steptest.Options{MaxCertDuration: 2 * 365 * 24 * time.Hour})
	// Fetching and decrypting the key is a test of its own.
	jwk, err := provisionerKey(ca.HTTPClient(), ca.URL, ca.Provisioner.KID, ca.Provisioner.Password)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("SignsMeshIntermediate", func(t *testing.T) { testSignsMeshIntermediate(t, ca, jwk) })
	t.Run("RefusesTokenTwice", func(t *testing.T) { testRefusesTokenTwice(t, ca, jwk) })
	t.Run("WrongProvisionerPassword", func(t *testing.T) { testWrongProvisionerPassword(t, ca) })
	t.Run("RefusesForeignKeyAndCN", func(t *testing.T) { testRefusesForeignKeyAndCN(t, ca, jwk) })
	t.Run("Lifetimes", func(t *testing.T) { testLifetimes(t, ca, jwk) })

	ca.Stop()
	if !ca.Exited() {
		t.Fatal("step-ca still running after Stop")
	}
	ca.Stop() // idempotent
}

func testSignsMeshIntermediate(t *testing.T, ca *steptest.CA, jwk *jose.JSONWebKey) {
	key, chain := requestIntermediate(t, ca, jwk)
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

func testRefusesTokenTwice(t *testing.T, ca *steptest.CA, jwk *jose.JSONWebKey) {
	client := ca.HTTPClient()
	ott, err := token(jwk, ca.Provisioner.Name, ca.URL, "meshid intermediate CA", []string{"spiffe://cluster.local"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, csr := intermediateCSR(t, "meshid intermediate CA")
	if _, err := sign(client, ca.URL, csr, ott, time.Hour); err != nil {
		t.Fatal(err)
	}
	_, err = sign(client, ca.URL, csr, ott, time.Hour)
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("second use of a token: %v, want 401", err)
	}
	t.Logf("step-ca's answer to a reused token: %v", err)
}

func testWrongProvisionerPassword(t *testing.T, ca *steptest.CA) {
	_, err := provisionerKey(ca.HTTPClient(), ca.URL, ca.Provisioner.KID, "not the password")
	want := "provisioner key " + ca.Provisioner.KID + ": failed to decrypt JWE: invalid password"
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %q", err, want)
	}
}

func testRefusesForeignKeyAndCN(t *testing.T, ca *steptest.CA, jwk *jose.JSONWebKey) {
	client := ca.HTTPClient()
	const cn = "meshid intermediate CA"

	// A token signed by a key that is not the provisioner's.
	other, err := jose.GenerateJWK("EC", "P-256", "ES256", "sig", ca.Provisioner.KID, 0)
	if err != nil {
		t.Fatal(err)
	}
	ott, err := token(other, ca.Provisioner.Name, ca.URL, cn, []string{"spiffe://cluster.local"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, csr := intermediateCSR(t, cn)
	_, err = sign(client, ca.URL, csr, ott, time.Hour)
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("token from a foreign key: %v, want 401", err)
	}
	t.Logf("step-ca's answer to a token from a foreign key: %v", err)

	// A CSR whose CN is not the token's subject.
	ott, err = token(jwk, ca.Provisioner.Name, ca.URL, cn, []string{"spiffe://cluster.local"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, csr = intermediateCSR(t, "someone else")
	_, err = sign(client, ca.URL, csr, ott, time.Hour)
	if err == nil || !strings.Contains(err.Error(), "403") {
		t.Errorf("CSR with another CN: %v, want 403", err)
	}
	t.Logf("step-ca's answer to a CSR with another CN: %v", err)
}

// step-ca enforces the provisioner's maximum lifetime (counting its one
// minute of backdating) but does not cap what it signs at its own
// intermediate's expiry: meshid-ca must cap its request, or check the
// answer, itself.
func testLifetimes(t *testing.T, ca *steptest.CA, jwk *jose.JSONWebKey) {
	client := ca.HTTPClient()
	const cn = "meshid intermediate CA"
	request := func(lifetime time.Duration) ([]*x509.Certificate, error) {
		ott, err := token(jwk, ca.Provisioner.Name, ca.URL, cn, []string{"spiffe://cluster.local"}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		_, csr := intermediateCSR(t, cn)
		return sign(client, ca.URL, csr, ott, lifetime)
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
	jwk, err := provisionerKey(ca.HTTPClient(), ca.URL, ca.Provisioner.KID, ca.Provisioner.Password)
	if err != nil {
		t.Fatal(err)
	}
	key, chain := requestIntermediate(t, ca, jwk)
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

// The provisioner NewPKI makes is the one step's tooling would: the JWE
// opens with the password to an ES256 key whose thumbprint is the kid.
func TestNewPKIProvisioner(t *testing.T) {
	pki, err := steptest.NewPKI(steptest.Options{Password: "pw"})
	if err != nil {
		t.Fatal(err)
	}
	plain, err := jose.Decrypt([]byte(pki.Provisioner.EncryptedKey), jose.WithPassword([]byte("pw")))
	if err != nil {
		t.Fatal(err)
	}
	var jwk jose.JSONWebKey
	if err := json.Unmarshal(plain, &jwk); err != nil {
		t.Fatal(err)
	}
	thumb, err := jose.Thumbprint(&jwk)
	if err != nil {
		t.Fatal(err)
	}
	if jwk.KeyID != pki.Provisioner.KID || thumb != pki.Provisioner.KID || jwk.Algorithm != "ES256" || jwk.IsPublic() {
		t.Errorf("kid %q, thumbprint %q, alg %q, public %v; want a private ES256 key whose kid %q is its thumbprint",
			jwk.KeyID, thumb, jwk.Algorithm, jwk.IsPublic(), pki.Provisioner.KID)
	}
	if _, err := jose.Decrypt([]byte(pki.Provisioner.EncryptedKey), jose.WithPassword([]byte("wrong"))); err == nil {
		t.Error("decrypted with a wrong password")
	}
	roots := x509.NewCertPool()
	roots.AddCert(pki.Root)
	if _, err := pki.Intermediate.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Error(err)
	}
	if pki.Root.MaxPathLen != 2 || pki.Intermediate.MaxPathLen != 1 {
		t.Errorf("path lengths root %d, intermediate %d; want 2, 1", pki.Root.MaxPathLen, pki.Intermediate.MaxPathLen)
	}
}

// Version names the step-ca that hack/step-ca.sh builds.
func TestVersionMatchesHack(t *testing.T) {
	b, err := os.ReadFile("../../hack/step-ca/go.mod")
	if err != nil {
		t.Fatal(err)
	}
	want := "github.com/smallstep/certificates " + steptest.Version + " "
	if !strings.Contains(string(b), want) {
		t.Errorf("hack/step-ca/go.mod does not require %q", strings.TrimSpace(want))
	}
}
