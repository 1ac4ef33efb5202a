package csr_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca/csr"
)

var (
	td     = spiffeid.RequireTrustDomainFromString("cluster.local")
	caller = spiffeid.RequireFromPath(td, "/ns/demo/sa/web")
)

var (
	keysOnce sync.Once
	ecKey    *ecdsa.PrivateKey
	rsaKey   *rsa.PrivateKey
)

func testKeys(t testing.TB) {
	keysOnce.Do(func() {
		ecKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		rsaKey, _ = rsa.GenerateKey(rand.Reader, 2048)
	})
}

func mustURL(t testing.TB, s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// request makes a PEM CSR from tmpl (the caller's URI when tmpl has none set
// and noURI is false) signed by key.
func request(t testing.TB, key crypto.Signer, edit func(*x509.CertificateRequest)) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{
		// Istio's agent sends an empty organization and one URI SAN.
		Subject: pkix.Name{Organization: []string{""}},
		URIs:    []*url.URL{caller.URL()},
	}
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func TestValidate(t *testing.T) {
	testKeys(t)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	rsa3072, _ := rsa.GenerateKey(rand.Reader, 3072)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)

	good := request(t, ecKey, nil)
	block, _ := pem.Decode(good)
	badSig := append([]byte(nil), block.Bytes...)
	badSig[len(badSig)-1] ^= 0xff
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: block.Bytes})

	for _, tc := range []struct {
		name string
		in   []byte
		want error  // nil for success
		msg  string // the exact client-facing message
	}{
		{name: "istio-style P-256", in: good},
		{name: "RSA 2048", in: request(t, rsaKey, nil)},
		{name: "RSA 3072", in: request(t, rsa3072, nil)},
		{name: "P-384", in: request(t, p384, nil)},
		{name: "RSA-PSS", in: request(t, rsaKey, func(r *x509.CertificateRequest) { r.SignatureAlgorithm = x509.SHA256WithRSAPSS })},
		{name: "P-256 with SHA-384", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.SignatureAlgorithm = x509.ECDSAWithSHA384 })},
		{name: "ECDSA with SHA-1", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.SignatureAlgorithm = x509.ECDSAWithSHA1 }),
			want: csr.ErrInvalid, msg: "invalid csr: signature must use SHA-256 or stronger, not ECDSA-SHA1"},
		{name: "RSA with SHA-1", in: request(t, rsaKey, func(r *x509.CertificateRequest) { r.SignatureAlgorithm = x509.SHA1WithRSA }),
			want: csr.ErrInvalid, msg: "invalid csr: signature must use SHA-256 or stronger, not SHA1-RSA"},
		{name: "empty", in: nil, want: csr.ErrInvalid, msg: "invalid csr: not PEM"},
		{name: "not PEM", in: []byte("hello"), want: csr.ErrInvalid, msg: "invalid csr: not PEM"},
		{name: "PEM but a certificate", in: certPEM, want: csr.ErrInvalid, msg: "invalid csr: PEM block is not a CERTIFICATE REQUEST"},
		{name: "not a CSR inside", in: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte("garbage")}), want: csr.ErrInvalid, msg: "invalid csr: malformed request"},
		{name: "two requests", in: append(append([]byte{}, good...), good...), want: csr.ErrInvalid, msg: "invalid csr: data after the PEM block"},
		{name: "bad signature", in: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: badSig}), want: csr.ErrInvalid, msg: "invalid csr: bad signature"},
		{name: "DNS name", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.DNSNames = []string{"web.demo.svc"} }), want: csr.ErrInvalid, msg: "invalid csr: DNS names are not allowed"},
		{name: "IP address", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.IPAddresses = []net.IP{net.IPv4(10, 0, 0, 1)} }), want: csr.ErrInvalid, msg: "invalid csr: IP addresses are not allowed"},
		{name: "email", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.EmailAddresses = []string{"a@b.c"} }), want: csr.ErrInvalid, msg: "invalid csr: email addresses are not allowed"},
		{name: "common name", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.Subject.CommonName = "web" }), want: csr.ErrInvalid, msg: "invalid csr: a subject common name is not allowed"},
		{name: "extra URI", in: request(t, ecKey, func(r *x509.CertificateRequest) {
			r.URIs = append(r.URIs, mustURL(t, "spiffe://cluster.local/ns/demo/sa/admin"))
		}), want: csr.ErrInvalid, msg: "invalid csr: exactly one URI SAN is required"},
		{name: "no URI", in: request(t, ecKey, func(r *x509.CertificateRequest) { r.URIs = nil }), want: csr.ErrInvalid, msg: "invalid csr: exactly one URI SAN is required"},
		{name: "another trust domain", in: request(t, ecKey, func(r *x509.CertificateRequest) {
			r.URIs = []*url.URL{mustURL(t, "spiffe://evil.example/ns/demo/sa/web")}
		}), want: csr.ErrNotCaller, msg: "csr names an identity other than the caller's"},
		{name: "another namespace", in: request(t, ecKey, func(r *x509.CertificateRequest) {
			r.URIs = []*url.URL{mustURL(t, "spiffe://cluster.local/ns/kube-system/sa/web")}
		}), want: csr.ErrNotCaller, msg: "csr names an identity other than the caller's"},
		{name: "another service account", in: request(t, ecKey, func(r *x509.CertificateRequest) {
			r.URIs = []*url.URL{mustURL(t, "spiffe://cluster.local/ns/demo/sa/admin")}
		}), want: csr.ErrNotCaller, msg: "csr names an identity other than the caller's"},
		{name: "RSA 1024", in: request(t, rsa1024, nil), want: csr.ErrInvalid, msg: "invalid csr: RSA key must be 2048, 3072 or 4096 bits"},
		{name: "P-521", in: request(t, p521, nil), want: csr.ErrInvalid, msg: "invalid csr: ECDSA key must be on P-256 or P-384"},
		{name: "P-224", in: request(t, p224, nil), want: csr.ErrInvalid, msg: "invalid csr: ECDSA key must be on P-256 or P-384"},
		{name: "Ed25519", in: request(t, ed, nil), want: csr.ErrInvalid, msg: "invalid csr: unsupported key type (want RSA or ECDSA)"},
		{name: "oversized", in: append(append([]byte{}, good...), make([]byte, csr.MaxPEMBytes)...), want: csr.ErrInvalid, msg: "invalid csr: too large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pub, err := csr.Validate(tc.in, caller)
			if tc.want == nil {
				if err != nil || pub == nil {
					t.Fatalf("Validate = %v, %v; want a key", pub, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if err.Error() != tc.msg {
				t.Errorf("message = %q, want %q", err.Error(), tc.msg)
			}
			if pub != nil {
				t.Error("a refused request returned a key")
			}
		})
	}
}

func TestMessagesCarryNoInput(t *testing.T) {
	testKeys(t)
	evil := request(t, ecKey, func(r *x509.CertificateRequest) { r.DNSNames = []string{"secret-name.example"} })
	_, err := csr.Validate(evil, caller)
	if err == nil || strings.Contains(err.Error(), "secret-name") {
		t.Errorf("err = %v: must refuse without echoing the request", err)
	}
}

// FuzzValidate feeds arbitrary bytes to the CSR check: it must never panic,
// and whatever it accepts must be a correctly signed request for the caller
// and nothing else.
func FuzzValidate(f *testing.F) {
	testKeys(f)
	f.Add(request(f, ecKey, nil))
	f.Add(request(f, rsaKey, nil))
	f.Add(request(f, ecKey, func(r *x509.CertificateRequest) { r.DNSNames = []string{"x"} }))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte("not pem"))
	f.Fuzz(func(t *testing.T, data []byte) {
		pub, err := csr.Validate(data, caller)
		if err != nil {
			if pub != nil {
				t.Fatal("key returned with an error")
			}
			if !errors.Is(err, csr.ErrInvalid) && !errors.Is(err, csr.ErrNotCaller) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		req, err := csr.Parse(data)
		if err != nil {
			t.Fatalf("Validate accepted what Parse refuses: %v", err)
		}
		if len(req.URIs) != 1 || req.URIs[0].String() != caller.String() || len(req.DNSNames)+len(req.IPAddresses)+len(req.EmailAddresses) != 0 {
			t.Fatalf("accepted a request naming %v %v %v %v", req.URIs, req.DNSNames, req.IPAddresses, req.EmailAddresses)
		}
	})
}
