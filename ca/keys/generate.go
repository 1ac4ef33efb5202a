package keys

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"time"
)

// Algorithm names a CA key type.
type Algorithm string

// Supported CA key types.
const (
	ECDSAP256 Algorithm = "ecdsa-p256"
	ECDSAP384 Algorithm = "ecdsa-p384"
	RSA2048   Algorithm = "rsa-2048"
	RSA3072   Algorithm = "rsa-3072"
	RSA4096   Algorithm = "rsa-4096"
)

// Algorithms lists the supported key types, default first.
var Algorithms = []Algorithm{ECDSAP256, ECDSAP384, RSA2048, RSA3072, RSA4096}

// ParseAlgorithm checks a key type name.
func ParseAlgorithm(s string) (Algorithm, error) {
	for _, a := range Algorithms {
		if string(a) == s {
			return a, nil
		}
	}
	return "", fmt.Errorf("keys: unknown key type %q (want one of %v)", s, Algorithms)
}

// GenerateKey makes a new private key of type alg.
func GenerateKey(alg Algorithm) (crypto.Signer, error) {
	switch alg {
	case ECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case RSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case RSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, fmt.Errorf("keys: unknown key type %q", alg)
}

// Options shape a newly generated CA.
type Options struct {
	TrustDomain     string
	Algorithm       Algorithm
	RootTTL         time.Duration
	IntermediateTTL time.Duration
	Now             time.Time
	// CAKey, when set, is the intermediate's key, in a KMS or HSM
	// (--ca-key-uri); otherwise one is generated.
	CAKey *External
}

// Defaults for generated CAs.
const (
	DefaultRootTTL         = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL = 365 * 24 * time.Hour
	caBackdate             = 5 * time.Minute
)

// Generate creates a self-signed root and a signing intermediate under it.
func Generate(opts Options) (*Material, error) {
	if opts.Algorithm == "" {
		opts.Algorithm = ECDSAP256
	}
	if opts.RootTTL == 0 {
		opts.RootTTL = DefaultRootTTL
	}
	if opts.IntermediateTTL == 0 {
		opts.IntermediateTTL = DefaultIntermediateTTL
	}
	if opts.IntermediateTTL > opts.RootTTL {
		return nil, fmt.Errorf("keys: intermediate TTL %s exceeds root TTL %s", opts.IntermediateTTL, opts.RootTTL)
	}
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	rootKey, err := GenerateKey(opts.Algorithm)
	if err != nil {
		return nil, err
	}
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{opts.TrustDomain}, CommonName: "meshid root CA"},
		NotBefore:             opts.Now.Add(-caBackdate),
		NotAfter:              opts.Now.Add(opts.RootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	if opts.TrustDomain != "" {
		// Whoever gets hold of an intermediate under this root, or trusts
		// it beside other roots (a federated or shared bundle), can vouch
		// only for this trust domain's SPIFFE IDs. Critical, as RFC 5280
		// asks: every verifier in a mesh (Go, BoringSSL in Envoy, OpenSSL)
		// understands it. DNS and IP names are not constrained, so the
		// CA's own serving certificates still verify.
		rootTmpl.PermittedURIDomains = []string{opts.TrustDomain}
		rootTmpl.PermittedDNSDomainsCritical = true
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("keys: signing root: %w", err)
	}
	root, err := x509.ParseCertificate(rootDER)
	if err != nil {
		return nil, fmt.Errorf("keys: %w", err)
	}
	m := &Material{RootCert: root, RootKey: rootKey, Roots: []*x509.Certificate{root}}
	if opts.CAKey != nil {
		m.CAKey, m.KeyURI = opts.CAKey.Signer, opts.CAKey.URI
	}
	if err := m.RenewIntermediate(opts.Algorithm, opts.IntermediateTTL, opts.Now); err != nil {
		return nil, err
	}
	return m, nil
}

// RenewIntermediate replaces the signing intermediate with a new key and
// certificate signed by the root. It needs the root key.
func (m *Material) RenewIntermediate(alg Algorithm, ttl time.Duration, now time.Time) error {
	if m.RootKey == nil {
		return fmt.Errorf("keys: renewing the intermediate needs the root key")
	}
	// A key in a KMS or HSM stays: the new certificate certifies it again.
	key := m.CAKey
	if m.KeyURI == "" {
		var err error
		if key, err = GenerateKey(alg); err != nil {
			return err
		}
	}
	notAfter := now.Add(ttl)
	if notAfter.After(m.RootCert.NotAfter) {
		notAfter = m.RootCert.NotAfter
	}
	org := m.RootCert.Subject.Organization
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: org, CommonName: "meshid intermediate CA"},
		NotBefore:             now.Add(-caBackdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	if tmpl.NotBefore.Before(m.RootCert.NotBefore) {
		tmpl.NotBefore = m.RootCert.NotBefore
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.RootCert, key.Public(), m.RootKey)
	if err != nil {
		return fmt.Errorf("keys: signing intermediate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("keys: %w", err)
	}
	m.CACert, m.CAKey, m.Chain = cert, key, nil
	return nil
}
