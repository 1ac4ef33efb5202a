package csr

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxPEMBytes bounds a request. An RSA-4096 request is under 2 KiB.
const MaxPEMBytes = 8 << 10

// ErrInvalid marks a malformed request or one asking for what no caller may
// have. Its messages are short and stable, fit to return to clients.
var ErrInvalid = errors.New("invalid csr")

// ErrNotCaller marks a well-formed request naming an identity other than the
// authenticated caller's.
var ErrNotCaller = errors.New("csr names an identity other than the caller's")

func invalid(reason string) error {
	return fmt.Errorf("%w: %s", ErrInvalid, reason)
}

// Parse decodes exactly one PEM CERTIFICATE REQUEST, checks that its key is
// one we sign for, and checks its signature.
func Parse(data []byte) (*x509.CertificateRequest, error) {
	if len(data) > MaxPEMBytes {
		return nil, invalid("too large")
	}
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, invalid("not PEM")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, invalid("PEM block is not a CERTIFICATE REQUEST")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, invalid("data after the PEM block")
	}
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, invalid("malformed request")
	}
	// The key is checked before the signature so that a huge RSA key costs
	// nothing to refuse.
	if err := checkKey(req.PublicKey); err != nil {
		return nil, err
	}
	// crypto/x509 still accepts SHA-1 (and MD5) on requests, though not on
	// certificates: refuse it here, so a proof of possession is as strong
	// as what is signed with it.
	switch req.SignatureAlgorithm {
	case x509.SHA256WithRSA, x509.SHA384WithRSA, x509.SHA512WithRSA,
		x509.SHA256WithRSAPSS, x509.SHA384WithRSAPSS, x509.SHA512WithRSAPSS,
		x509.ECDSAWithSHA256, x509.ECDSAWithSHA384, x509.ECDSAWithSHA512:
	default:
		return nil, invalid("signature must use SHA-256 or stronger, not " + req.SignatureAlgorithm.String())
	}
	if err := req.CheckSignature(); err != nil {
		return nil, invalid("bad signature")
	}
	return req, nil
}

func checkKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 2048, 3072, 4096:
			return nil
		}
		return invalid("RSA key must be 2048, 3072 or 4096 bits")
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384():
			return nil
		}
		return invalid("ECDSA key must be on P-256 or P-384")
	}
	return invalid("unsupported key type (want RSA or ECDSA)")
}

// CheckNames accepts a request whose only name is one URI SAN equal to id.
func CheckNames(req *x509.CertificateRequest, id spiffeid.ID) error {
	switch {
	case len(req.DNSNames) > 0:
		return invalid("DNS names are not allowed")
	case len(req.IPAddresses) > 0:
		return invalid("IP addresses are not allowed")
	case len(req.EmailAddresses) > 0:
		return invalid("email addresses are not allowed")
	case req.Subject.CommonName != "":
		return invalid("a subject common name is not allowed")
	case len(req.URIs) != 1:
		return invalid("exactly one URI SAN is required")
	case req.URIs[0].String() != id.String():
		return ErrNotCaller
	}
	return nil
}

// Validate parses data and checks that it asks for id only; it returns the
// key the certificate is to certify.
func Validate(data []byte, id spiffeid.ID) (crypto.PublicKey, error) {
	req, err := Parse(data)
	if err != nil {
		return nil, err
	}
	if err := CheckNames(req, id); err != nil {
		return nil, err
	}
	return req.PublicKey, nil
}
