// The PKCS#11 backend of go.step.sm/crypto/kms needs cgo; without it the
// backend is a stub that only returns an error.
//go:build cgo

package hsmtest_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"
	_ "go.step.sm/crypto/kms/pkcs11" // registers the "pkcs11" kms type

	"github.com/meshid/meshid/internal/hsmtest"
)

func open(t *testing.T, uri string) kms.KeyManager {
	t.Helper()
	km, err := kms.New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	return km
}

// What --ca-key-uri needs from an HSM: make a P-256 key that never leaves
// it, sign with it (an intermediate CA certificate here), and find the same
// key again after the process closed the token.
func TestSoftHSMKeySignsCertificate(t *testing.T) {
	tok := hsmtest.SoftHSM(t, "meshid")
	keyURI := tok.KeyURI("7331", "meshid-ca")

	km := open(t, tok.URI)
	created, err := km.CreateKey(&apiv1.CreateKeyRequest{
		Name:               keyURI,
		SignatureAlgorithm: apiv1.ECDSAWithSHA256,
	})
	if err != nil {
		t.Fatal(err)
	}
	pub, ok := created.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("CreateKey made a %T, want a P-256 key", created.PublicKey)
	}
	signer, err := km.CreateSigner(&created.CreateSignerRequest)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("meshid"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatal("the HSM's signature does not verify")
	}

	// A self-signed CA certificate, signed inside the token.
	now := time.Now()
	td, _ := url.Parse("spiffe://cluster.local")
	tmpl := &x509.Certificate{
		Subject:                     pkix.Name{CommonName: "meshid HSM test"},
		URIs:                        []*url.URL{td},
		NotBefore:                   now.Add(-time.Minute),
		NotAfter:                    now.Add(time.Hour),
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid:       true,
		IsCA:                        true,
		MaxPathLenZero:              true,
		PermittedURIDomains:         []string{"cluster.local"},
		PermittedDNSDomainsCritical: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		t.Fatal(err)
	}
	if err := km.Close(); err != nil {
		t.Fatal(err)
	}

	// As after a restart: the key is found by its URI.
	km = open(t, tok.URI)
	defer km.Close()
	again, err := km.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: keyURI})
	if err != nil {
		t.Fatal(err)
	}
	if !pub.Equal(again) {
		t.Fatal("GetPublicKey after reopening returned another key")
	}
	signer, err = km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: keyURI})
	if err != nil {
		t.Fatal(err)
	}
	sig, err = signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatal("the reopened key's signature does not verify")
	}
}

func TestSoftHSMWrongPIN(t *testing.T) {
	tok := hsmtest.SoftHSM(t, "meshid")
	uri := strings.Replace(tok.URI, "pin-value="+tok.PIN, "pin-value=0000", 1)
	_, err := kms.New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err == nil {
		t.Fatal("opened the token with a wrong PIN")
	}
	t.Logf("wrong PIN: %v", err)
	if !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") {
		t.Errorf("error %q does not name CKR_PIN_INCORRECT", err)
	}
}
