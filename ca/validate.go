package ca

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// validateLeaf checks what every certificate we sign must satisfy, in the
// manner of SPIRE's credential validator: it is no CA, it chains to the issuer
// (by name and key identifier: the signature itself was checked by
// x509.CreateCertificate), it holds the requested key, and it lies within the
// issuer's validity, which NewIssuer verified against the trust bundle.
func validateLeaf(leaf *x509.Certificate, pub crypto.PublicKey, is *Issuer, now time.Time) error {
	switch {
	case leaf.IsCA || !leaf.BasicConstraintsValid:
		return badCert("must carry basicConstraints CA:FALSE")
	case leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0:
		return badCert("must not have keyCertSign or cRLSign")
	case leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0:
		return badCert("lacks digitalSignature")
	case !bytes.Equal(leaf.RawIssuer, is.cert.RawSubject):
		return badCert("issuer name differs from the signing certificate's subject")
	case len(is.cert.SubjectKeyId) > 0 && !bytes.Equal(leaf.AuthorityKeyId, is.cert.SubjectKeyId):
		return badCert("authority key ID differs from the signing certificate's")
	case !leaf.NotAfter.After(now):
		return badCert("already expired")
	case leaf.NotBefore.Before(is.notBefore) || leaf.NotAfter.After(is.notAfter):
		return badCert("validity exceeds the issuer's")
	}
	if k, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		return badCert("public key differs from the requested one")
	}
	return nil
}

// checkWorkloadLeaf checks the SPIFFE shape: exactly one URI SAN, the
// requested ID, no other name, usable for both ends of mTLS.
func checkWorkloadLeaf(leaf *x509.Certificate, id spiffeid.ID) error {
	switch {
	case len(leaf.URIs) != 1:
		return badCert("must have exactly one URI SAN")
	case leaf.URIs[0].String() != id.String():
		return badCert("URI SAN is not the requested SPIFFE ID")
	case len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0:
		return badCert("must have no DNS, IP or email SAN")
	case leaf.Subject.CommonName != "":
		return badCert("must have an empty subject")
	case !hasExtKeyUsage(leaf, x509.ExtKeyUsageServerAuth) || !hasExtKeyUsage(leaf, x509.ExtKeyUsageClientAuth):
		return badCert("must allow serverAuth and clientAuth")
	}
	return nil
}

func checkServingLeaf(leaf *x509.Certificate) error {
	switch {
	case len(leaf.DNSNames) == 0 && len(leaf.IPAddresses) == 0:
		return badCert("serving certificate has no DNS name or IP address")
	case !hasExtKeyUsage(leaf, x509.ExtKeyUsageServerAuth):
		return badCert("serving certificate must allow serverAuth")
	}
	return nil
}

func hasExtKeyUsage(c *x509.Certificate, want x509.ExtKeyUsage) bool {
	for _, u := range c.ExtKeyUsage {
		if u == want {
			return true
		}
	}
	return false
}

func badCert(reason string) error {
	return fmt.Errorf("%w: %s", ErrBadCertificate, reason)
}
