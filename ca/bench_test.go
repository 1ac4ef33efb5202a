package ca_test

import (
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net/url"
	"testing"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/csr"
	"github.com/meshid/meshid/ca/keys"
)

// BenchmarkIssue measures signing alone: template, sign, re-validate.
func BenchmarkIssue(b *testing.B) {
	is, _ := newIssuer(b, keys.Options{Now: time.Now()})
	a, _ := ca.New(ca.Config{Issuers: fixedSource{is}})
	pub := ecKey(b).Public()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := a.Issue(ca.Request{ID: webID, PublicKey: pub}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSigningPath is the in-process limit of the CA: parse the CSR,
// check its signature and names, then create and check the certificate, on
// all cores, with no gRPC and no authentication.
func BenchmarkSigningPath(b *testing.B) {
	is, _ := newIssuer(b, keys.Options{Now: time.Now()})
	a, _ := ca.New(ca.Config{Issuers: fixedSource{is}})
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{Organization: []string{""}},
		URIs:    []*url.URL{webID.URL()},
	}, ecKey(b))
	if err != nil {
		b.Fatal(err)
	}
	csrPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			pub, err := csr.Validate(csrPEM, webID)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := a.Issue(ca.Request{ID: webID, PublicKey: pub}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
