package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"
)

// epoch is "now" for the test chains: certificates are made at test time
// around it, never committed.
var epoch = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

const webID = "spiffe://cluster.local/ns/shop/sa/web"

// testChain is a small test CA: root → intermediate → leaf with a SPIFFE
// URI SAN. Every key comes from a fixed seed and Ed25519 signatures are
// deterministic, so the same certificates come out at every run and golden
// files can show real serials and fingerprints.
type testChain struct {
	root, inter, leaf *x509.Certificate
	rootKey, interKey ed25519.PrivateKey
	leafKey           *ecdsa.PrivateKey
}

func newTestChain(t testing.TB, seed byte) testChain {
	t.Helper()
	var c testChain
	c.rootKey = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, 32))
	c.interKey = ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed + 1}, 32))
	d := bytes.Repeat([]byte{seed + 2}, 32)
	leafKey, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	if err != nil {
		t.Fatal(err)
	}
	c.leafKey = leafKey
	c.root = sign(t, &x509.Certificate{
		SerialNumber:          big.NewInt(int64(seed)<<8 | 1),
		Subject:               pkix.Name{Organization: []string{"cluster.local"}, CommonName: "test root CA"},
		NotBefore:             epoch.Add(-time.Hour),
		NotAfter:              epoch.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil, c.rootKey.Public(), c.rootKey)
	c.inter = sign(t, &x509.Certificate{
		SerialNumber:          big.NewInt(int64(seed)<<8 | 2),
		Subject:               pkix.Name{Organization: []string{"cluster.local"}, CommonName: "test intermediate CA"},
		NotBefore:             epoch.Add(-time.Hour),
		NotAfter:              epoch.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, c.root, c.interKey.Public(), c.rootKey)
	serial, _ := new(big.Int).SetString("5eed0f00d1234567890abcdef0123456", 16)
	serial.Add(serial, big.NewInt(int64(seed)))
	c.leaf = sign(t, &x509.Certificate{
		SerialNumber:          serial,
		URIs:                  []*url.URL{mustURL(t, webID)},
		DNSNames:              []string{"web.shop.svc"},
		NotBefore:             epoch.Add(-time.Minute),
		NotAfter:              epoch.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}, c.inter, c.leafKey.Public(), c.interKey)
	return c
}

func sign(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	t.Helper()
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustURL(t testing.TB, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func (c testChain) certs() []*x509.Certificate { return []*x509.Certificate{c.leaf, c.inter, c.root} }

func pemOf(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

func derOf(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, c.Raw...)
	}
	return b
}

func keyPEM(t testing.TB, key crypto.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func writeFile(t testing.TB, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type result struct {
	code           int
	stdout, stderr string
}

func runCLI(t testing.TB, stdin []byte, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, bytes.NewReader(stdin), &out, &errb)
	return result{code, out.String(), errb.String()}
}

func (r result) want(t testing.TB, code int, stderr ...string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, code, r.stdout, r.stderr)
	}
	for _, s := range stderr {
		if !strings.Contains(r.stderr, s) {
			t.Errorf("stderr %q does not say %q", r.stderr, s)
		}
	}
}

func inspectJSON(t testing.TB, r result) chainReport {
	t.Helper()
	var rep chainReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("output is not a chain report: %v\n%s", err, r.stdout)
	}
	return rep
}

func TestInspectPEMChain(t *testing.T) {
	c := newTestChain(t, 1)
	path := writeFile(t, "chain.pem", pemOf(c.certs()...))
	r := runCLI(t, nil, "inspect", "--at", epoch.Format(time.RFC3339), "-o", "json", path)
	r.want(t, exitOK)
	rep := inspectJSON(t, r)
	if got := len(rep.Certificates); got != 3 {
		t.Fatalf("%d certificates, want 3", got)
	}
	for i, want := range []string{"leaf", "intermediate", "root"} {
		if got := rep.Certificates[i].Position; got != want {
			t.Errorf("certificate %d is the %s, want %s", i+1, got, want)
		}
	}
	leaf := rep.Certificates[0]
	if leaf.SPIFFEID != webID || !reflect.DeepEqual(leaf.OtherSANs, []string{"DNS:web.shop.svc"}) {
		t.Errorf("leaf names: SPIFFE ID %q, other SANs %q", leaf.SPIFFEID, leaf.OtherSANs)
	}
	if leaf.Serial != c.leaf.SerialNumber.Text(16) || leaf.Key != "ECDSA P-256" || leaf.IsCA || leaf.SignatureAlgorithm != "Ed25519" {
		t.Errorf("leaf: %+v", leaf)
	}
	if leaf.TimeLeft != "60m" || leaf.Status != statusValid || !leaf.NotAfter.Equal(c.leaf.NotAfter) {
		t.Errorf("leaf at %s: time left %q, status %q, not after %s", epoch, leaf.TimeLeft, leaf.Status, leaf.NotAfter)
	}
	if v := rep.Verification; v.Checked || v.Verified || v.Detail != "not verified (no --bundle given)" {
		t.Errorf("verification without a bundle: %+v", v)
	}
	if rep.PrivateKeyPresent {
		t.Error("a private key is reported where there is none")
	}
}

func TestInspectDERChainAndStdin(t *testing.T) {
	c := newTestChain(t, 1)
	want := runCLI(t, nil, "inspect", "--at", epoch.Format(time.RFC3339), "-o", "json", writeFile(t, "chain.pem", pemOf(c.certs()...)))
	want.want(t, exitOK)
	for name, args := range map[string][]string{
		"DER file":  {writeFile(t, "chain.der", derOf(c.certs()...))},
		"DER stdin": {"-"},
	} {
		t.Run(name, func(t *testing.T) {
			r := runCLI(t, derOf(c.certs()...), append([]string{"inspect", "--at", epoch.Format(time.RFC3339), "-o", "json"}, args...)...)
			r.want(t, exitOK)
			if r.stdout != want.stdout {
				t.Errorf("DER report differs from PEM's:\n%s\nwant:\n%s", r.stdout, want.stdout)
			}
		})
	}
	// PEM on stdin too, and a single DER certificate.
	runCLI(t, pemOf(c.leaf, c.inter), "inspect", "-").want(t, exitOK)
	r := runCLI(t, nil, "inspect", "-o", "json", writeFile(t, "leaf.der", c.leaf.Raw))
	r.want(t, exitOK)
	if rep := inspectJSON(t, r); len(rep.Certificates) != 1 || rep.Certificates[0].Position != "leaf" {
		t.Errorf("single DER leaf: %+v", rep.Certificates)
	}
}

func TestInspectNeverPrintsPrivateKey(t *testing.T) {
	c := newTestChain(t, 1)
	key := keyPEM(t, c.leafKey)
	body := strings.Split(string(key), "\n")[1] // a line of the key's base64
	data := append(append(append([]byte("# written by a tool\n"), key...), pemOf(c.leaf, c.inter)...), "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"...)
	path := writeFile(t, "bundle.pem", data)
	for _, format := range []string{"table", "json", "yaml"} {
		r := runCLI(t, nil, "inspect", "-o", format, path)
		r.want(t, exitOK)
		for _, leak := range []string{"PRIVATE KEY", "-----BEGIN", body, body[:20]} {
			if strings.Contains(r.stdout+r.stderr, leak) {
				t.Errorf("-o %s: output holds %q", format, leak)
			}
		}
		if format == "table" && !strings.Contains(r.stdout, "private key present (not shown)") {
			t.Errorf("table does not note the key:\n%s", r.stdout)
		}
		if format == "json" && !inspectJSON(t, r).PrivateKeyPresent {
			t.Error("JSON does not note the key")
		}
	}
	// A key alone is not a certificate, and is not shown either.
	r := runCLI(t, key, "inspect", "-")
	r.want(t, exitUsage, "no CERTIFICATE block", "private key (not shown)")
	// Nor is a DER key.
	der, _ := x509.MarshalPKCS8PrivateKey(c.leafKey)
	r = runCLI(t, der, "inspect", "-")
	r.want(t, exitUsage, "is a private key, not a certificate (not shown)")
}

func TestInspectVerifiesAgainstBundle(t *testing.T) {
	c := newTestChain(t, 1)
	chain := writeFile(t, "chain.pem", pemOf(c.leaf, c.inter))
	spiffeJSON, err := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{c.root}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for name, bundle := range map[string][]byte{
		"PEM":         pemOf(c.root),
		"DER":         c.root.Raw,
		"SPIFFE JSON": spiffeJSON,
	} {
		t.Run(name, func(t *testing.T) {
			r := runCLI(t, nil, "inspect", "--bundle", writeFile(t, "bundle", bundle), "--at", epoch.Format(time.RFC3339), "-o", "json", chain)
			r.want(t, exitOK)
			v := inspectJSON(t, r).Verification
			if !v.Checked || !v.Verified || v.Root != c.root.Subject.String() || v.Roots != 1 || !v.At.Equal(epoch) {
				t.Errorf("verification: %+v", v)
			}
		})
	}
}

func TestInspectVerificationFailures(t *testing.T) {
	c := newTestChain(t, 1)
	other := newTestChain(t, 7)
	chain := writeFile(t, "chain.pem", pemOf(c.certs()...))
	for _, tc := range []struct {
		name   string
		bundle []byte
		at     time.Time
		detail string
		status string // the leaf's
	}{
		{"another root", pemOf(other.root), epoch, "x509: certificate signed by unknown authority", statusValid},
		{"expired leaf", pemOf(c.root), epoch.Add(2 * time.Hour), `certificate 1 (spiffe://cluster.local/ns/shop/sa/web) expired at 2030-01-02T04:04:05Z, 60m before the time checked`, statusExpired},
		{"leaf not yet valid", pemOf(c.root), epoch.Add(-30 * time.Minute), "certificate 1 (spiffe://cluster.local/ns/shop/sa/web) is not valid until 2030-01-02T03:03:05Z, 29m after the time checked", statusNotYet},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bundle := writeFile(t, "bundle.pem", tc.bundle)
			// The report is printed all the same, and the exit code is 1.
			r := runCLI(t, nil, "inspect", "--bundle", bundle, "--at", tc.at.Format(time.RFC3339), "-o", "json", chain)
			r.want(t, exitFailed, "does not verify against --bundle")
			rep := inspectJSON(t, r)
			if v := rep.Verification; !v.Checked || v.Verified || !strings.Contains(v.Detail, tc.detail) {
				t.Errorf("verification %+v, want the detail %q", v, tc.detail)
			}
			if got := rep.Certificates[0].Status; got != tc.status {
				t.Errorf("leaf status %q, want %q", got, tc.status)
			}
			r = runCLI(t, nil, "inspect", "--bundle", bundle, "--at", tc.at.Format(time.RFC3339), chain)
			r.want(t, exitFailed)
			if !strings.Contains(r.stdout, "Verification:  FAILED: "+tc.detail) {
				t.Errorf("table does not say FAILED: %s\n%s", tc.detail, r.stdout)
			}
		})
	}
	r := runCLI(t, nil, "inspect", "--at", epoch.Add(2*time.Hour).Format(time.RFC3339), chain)
	r.want(t, exitOK) // nothing to verify against: an expired certificate is still decoded
	if !strings.Contains(r.stdout, "Time Left:            expired 60m ago") {
		t.Errorf("expired leaf's time left:\n%s", r.stdout)
	}
}

func TestInspectRefusesBadInput(t *testing.T) {
	c := newTestChain(t, 1)
	substitute := sign(t, &x509.Certificate{ // same name as the intermediate, another key
		SerialNumber:          big.NewInt(99),
		Subject:               c.inter.Subject,
		NotBefore:             epoch.Add(-time.Hour),
		NotAfter:              epoch.Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, c.root, newTestChain(t, 9).interKey.Public(), c.rootKey)
	full := derOf(c.certs()...)
	for _, tc := range []struct {
		name string
		data []byte
		want []string
	}{
		{"reverse order", pemOf(c.root, c.inter, c.leaf), []string{`certificate 1 (subject "CN=test root CA,O=cluster.local") is not issued by certificate 2 (subject "CN=test intermediate CA,O=cluster.local")`, "reverse order (root first): put the leaf first"}},
		{"root in the middle", pemOf(c.leaf, c.root, c.inter), []string{"certificate 1 (spiffe://cluster.local/ns/shop/sa/web) is not issued by certificate 2", `its issuer is "CN=test intermediate CA,O=cluster.local"`}},
		{"missing intermediate", pemOf(c.leaf, c.root), []string{"certificate 1 (spiffe://cluster.local/ns/shop/sa/web) is not issued by certificate 2"}},
		{"same name, other key", pemOf(c.leaf, substitute, c.root), []string{"is not issued by certificate 2", "the names match but the signature does not check"}},
		{"garbage", []byte("hello, this is not a certificate\n"), []string{": no certificate found: not PEM and not DER (no \"-----BEGIN\" line, and DER starts with byte 0x30, not 0x68)"}},
		{"truncated DER", full[:len(full)-10], []string{"DER: after certificate 2", "truncated: the certificate declares"}},
		{"truncated first DER", c.leaf.Raw[:100], []string{"DER: truncated"}},
		{"truncated DER header", []byte{0x30, 0x82, 0x01}, []string{"DER: truncated: 3 bytes where the DER header needs 4"}},
		{"DER then junk", slices.Concat(c.leaf.Raw, []byte("\n")), []string{"DER: after certificate 1 (byte"}},
		{"not a certificate in DER", []byte{0x30, 0x03, 0x02, 0x01, 0x01}, []string{"DER certificate 1: x509:"}},
		{"truncated PEM", pemOf(c.leaf, c.inter)[:900], []string{"1 of 2 PEM blocks are malformed or truncated"}},
		{"BEGIN without a block", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n"), []string{"no certificate found: not PEM and not DER"}},
		{"corrupt PEM certificate", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), []string{"PEM certificate 1: x509:"}},
		{"empty", nil, []string{"no certificate found: the input is empty"}},
		{"blank", []byte(" \n\t\n"), []string{"no certificate found: the input is empty"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeFile(t, "input", tc.data)
			r := runCLI(t, nil, "inspect", path)
			r.want(t, exitUsage, append(tc.want, path+": ")...)
			if r.stdout != "" {
				t.Errorf("output on error:\n%s", r.stdout)
			}
			// The same from stdin.
			runCLI(t, tc.data, "inspect", "-").want(t, exitUsage, append(tc.want, "stdin: ")...)
		})
	}
	missing := filepath.Join(t.TempDir(), "missing.pem")
	runCLI(t, nil, "inspect", missing).want(t, exitUsage, "open "+missing+": no such file or directory")
	path := writeFile(t, "chain.pem", pemOf(c.leaf))
	runCLI(t, nil, "inspect").want(t, exitUsage, "inspect takes one argument")
	runCLI(t, nil, "inspect", path, path).want(t, exitUsage, "inspect takes one argument")
	runCLI(t, nil, "inspect", "--at", "yesterday", path).want(t, exitUsage, `--at "yesterday": want an RFC 3339 time`)
	runCLI(t, nil, "inspect", "-o", "wide", path).want(t, exitUsage, `unknown output format "wide": want table, json or yaml`)
	runCLI(t, nil, "inspect", "--bundle", missing, path).want(t, exitUsage, "--bundle: open "+missing)
	runCLI(t, nil, "inspect", "--bundle", writeFile(t, "b.json", []byte(`{"keys": []}`)), path).want(t, exitUsage, "no X.509 authority in the bundle")
	runCLI(t, nil, "inspect", "--bundle", writeFile(t, "b.json", []byte(`{"keys": `)), path).want(t, exitUsage, "unable to parse JWKS")
}

func TestInspectSetOfRoots(t *testing.T) {
	a, b := newTestChain(t, 1), newTestChain(t, 7)
	path := writeFile(t, "roots.pem", pemOf(a.root, b.root))
	r := runCLI(t, nil, "inspect", "--bundle", writeFile(t, "bundle.pem", pemOf(b.root, a.root)), "--at", epoch.Format(time.RFC3339), "-o", "json", path)
	r.want(t, exitOK)
	rep := inspectJSON(t, r)
	if len(rep.Certificates) != 2 || rep.Certificates[0].Position != "root" || rep.Certificates[1].Position != "root" || !rep.Verification.Verified {
		t.Errorf("two roots: %+v", rep)
	}
	r = runCLI(t, nil, "inspect", "--bundle", writeFile(t, "bundle.pem", pemOf(a.root)), "--at", epoch.Format(time.RFC3339), "-o", "json", path)
	r.want(t, exitFailed)
	if v := inspectJSON(t, r).Verification; !strings.HasPrefix(v.Detail, `root 2 (subject "CN=test root CA,O=cluster.local"): x509: certificate signed by unknown authority`) {
		t.Errorf("a root missing from the bundle: %+v", v)
	}
}

func TestKeyDescription(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		key  any
		want string
	}{
		{&rsaKey.PublicKey, "RSA 2048"},
		{&p384.PublicKey, "ECDSA P-384"},
		{edPub, "Ed25519"},
		{nil, "unknown"},
	} {
		if got := keyDescription(tc.key); got != tc.want {
			t.Errorf("keyDescription(%T) = %q, want %q", tc.key, got, tc.want)
		}
	}
}

// TestInspectGolden compares the table with testdata/inspect.golden: the
// chain is the same at every run (see testChain), "now" is --at.
func TestInspectGolden(t *testing.T) {
	c := newTestChain(t, 1)
	data := append(keyPEM(t, c.leafKey), pemOf(c.certs()...)...)
	r := runCLI(t, data, "inspect", "--bundle", writeFile(t, "root.pem", pemOf(c.root)), "--at", epoch.Add(30*time.Minute).Format(time.RFC3339), "-")
	r.want(t, exitOK)
	golden(t, "inspect.golden", r.stdout)
}

func TestChainReportRoundTrip(t *testing.T) {
	c := newTestChain(t, 1)
	rep := inspectChain(c.certs(), []*x509.Certificate{c.root}, epoch)
	rep.PrivateKeyPresent = true
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back chainReport
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, rep) {
		t.Errorf("JSON round trip:\n%+v\nwant\n%+v", back, rep)
	}
	y, err := yaml.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	back = chainReport{}
	if err := yaml.Unmarshal(y, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, rep) {
		t.Errorf("YAML round trip:\n%+v\nwant\n%+v", back, rep)
	}
	// Field names are snake_case, times RFC 3339 in UTC.
	for _, want := range []string{`"spiffe_id":"spiffe://cluster.local/ns/shop/sa/web"`, `"not_after":"2030-01-02T04:04:05Z"`, `"sha256_fingerprint":"`, `"private_key_present":true`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON lacks %s:\n%s", want, b)
		}
	}
}

// FuzzDecodeChain: any bytes give certificates or an error, never a panic,
// and whatever decodes can be checked for order and described. (Verifying
// is crypto/x509's and costs ten times the rest: it is left out, so that
// each input, and the minimizing of new ones, stays fast.)
func FuzzDecodeChain(f *testing.F) {
	c := newTestChain(f, 1)
	f.Add(pemOf(c.leaf, c.inter))
	f.Add(derOf(c.leaf, c.inter))
	f.Add(append(keyPEM(f, c.leafKey), pemOf(c.leaf)...))
	f.Add(c.leaf.Raw[:300])
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, _, err := decodeChain(data)
		if (err == nil) == (len(certs) == 0) {
			t.Fatalf("%d certificates and error %v", len(certs), err)
		}
		if err == nil && checkOrder(certs) == nil {
			inspectChain(certs, nil, epoch)
		}
	})
}

// Usage errors of every kind exit 2, as the README documents: a command
// that does not exist, a missing argument, a bad flag.
func TestUsageErrorsExit2(t *testing.T) {
	runCLI(t, nil, "bogus").want(t, exitUsage, `unknown command "bogus"`)
	runCLI(t, nil, "deny").want(t, exitUsage, "want 1 argument")
	runCLI(t, nil, "certs", "--no-such-flag").want(t, exitUsage, "unknown flag: --no-such-flag")
}
