package ca

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"time"
)

// Issuer is a CA certificate and its key, checked once against the trust
// bundle so that every certificate it signs can be trusted without verifying
// the whole chain again on the hot path.
type Issuer struct {
	cert   *x509.Certificate
	signer crypto.Signer
	chain  []*x509.Certificate // cert first, its root last, as verified
	roots  []*x509.Certificate

	chainPEM  []string // PEM of chain, in order, for responses
	rootsPEM  []byte
	bundlePEM string    // every root, the chain's own first: a response's last element
	notBefore time.Time // latest NotBefore along chain
	notAfter  time.Time // earliest NotAfter along chain
}

// NewIssuer checks that signer holds the key of cert, that cert may sign
// certificates, and that cert chains to one of roots through intermediates at
// time now. intermediates may be empty, and cert may itself be a root.
func NewIssuer(cert *x509.Certificate, signer crypto.Signer, intermediates, roots []*x509.Certificate, now time.Time) (*Issuer, error) {
	if cert == nil || signer == nil {
		return nil, errorf("issuer needs a certificate and a key")
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, errorf("CA key does not match CA certificate %q", cert.Subject)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, errorf("CA certificate %q is not a CA (basicConstraints CA:FALSE or missing)", cert.Subject)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errorf("CA certificate %q lacks the keyCertSign key usage", cert.Subject)
	}
	if len(roots) == 0 {
		return nil, errorf("trust bundle is empty")
	}
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	interPool := x509.NewCertPool()
	for _, c := range intermediates {
		interPool.AddCert(c)
	}
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots:         rootPool,
		Intermediates: interPool,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, errorf("CA certificate %q does not chain to the trust bundle: %w", cert.Subject, err)
	}
	chain := chains[0]
	is := &Issuer{
		cert:      cert,
		signer:    signer,
		chain:     chain,
		roots:     roots,
		notBefore: chain[0].NotBefore,
		notAfter:  chain[0].NotAfter,
	}
	for _, c := range chain {
		is.chainPEM = append(is.chainPEM, string(EncodePEM(c)))
		if c.NotBefore.After(is.notBefore) {
			is.notBefore = c.NotBefore
		}
		if c.NotAfter.Before(is.notAfter) {
			is.notAfter = c.NotAfter
		}
	}
	for _, r := range roots {
		is.rootsPEM = append(is.rootsPEM, EncodePEM(r)...)
	}
	is.bundlePEM = is.chainPEM[len(is.chainPEM)-1]
	for _, r := range roots {
		if !r.Equal(is.Root()) {
			is.bundlePEM += string(EncodePEM(r))
		}
	}
	return is, nil
}

// Certificate is the CA certificate that signs.
func (is *Issuer) Certificate() *x509.Certificate { return is.cert }

// Chain is the signing certificate followed by its issuers, root last.
func (is *Issuer) Chain() []*x509.Certificate { return is.chain }

// Roots is the trust bundle: every root currently trusted.
func (is *Issuer) Roots() []*x509.Certificate { return is.roots }

// RootsPEM is the trust bundle in PEM.
func (is *Issuer) RootsPEM() []byte { return is.rootsPEM }

// NotAfter is when the first certificate of the chain expires; nothing this
// issuer signs may outlive it.
func (is *Issuer) NotAfter() time.Time { return is.notAfter }

// Root is the root the signing chain ends in.
func (is *Issuer) Root() *x509.Certificate { return is.chain[len(is.chain)-1] }

// Fingerprint is the hex SHA-256 of the signing certificate.
func (is *Issuer) Fingerprint() string { return Fingerprint(is.cert) }

// Fingerprint is the hex SHA-256 of a certificate's DER.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// EncodePEM encodes one certificate as PEM.
func EncodePEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// ParseCertificatesPEM decodes every CERTIFICATE block in data, refusing any
// other block type and data that holds no certificate.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := bytes.TrimSpace(data)
	for len(rest) > 0 {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, fmt.Errorf("ca: data after certificate %d is not PEM", len(certs))
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("ca: PEM block %d is %q, want CERTIFICATE", len(certs)+1, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("ca: certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
		rest = bytes.TrimSpace(rest)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("ca: no PEM certificate found")
	}
	return certs, nil
}
