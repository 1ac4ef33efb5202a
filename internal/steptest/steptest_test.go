package steptest_test

import (
	"crypto/x509"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"go.step.sm/crypto/jose"

	"github.com/meshid/meshid/internal/steptest"
)

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
