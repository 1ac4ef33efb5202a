package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
)

// maxInput bounds what inspect reads: a chain is a few kilobytes.
const maxInput = 16 << 20

func newInspectCommand() *cobra.Command {
	var (
		bundlePath string
		atFlag     string
		sf         serverFlags
	)
	cmd := &cobra.Command{
		Use:   "inspect FILE|-",
		Short: "Decode a certificate chain and verify it against a bundle",
		Long: `inspect decodes a certificate chain, leaf first, from FILE or from stdin (-):
PEM (CERTIFICATE blocks; other blocks are skipped, and a private key is noted but
never shown) or DER (one certificate or several concatenated, as the SPIFFE
Workload API sends them). It shows each certificate's position, names, SPIFFE ID,
serial, validity, key and fingerprint, then verifies the chain against the roots
in --bundle (PEM or DER certificates, or a SPIFFE bundle: JWKS with x5c) at --at,
or, without --bundle but with --ca-file and credentials, against the bundle
meshid-ca's admin API serves now.

Exit codes: 0 decoded (and verified, when roots were given); 1 the chain does not
verify, or the CA could not be asked; 2 unreadable input or a chain out of order.`,
		Example: `  meshidctl inspect ./var/run/secrets/workload/cert-chain.pem
  meshidctl inspect --bundle root-cert.pem cert-chain.pem
  meshidctl inspect --ca-file root-cert.pem --token-file admin.token cert-chain.pem   # the CA's bundle now
  kubectl get secret -n istio-system cacerts -o jsonpath='{.data.ca-cert\.pem}' | base64 -d | meshidctl inspect -
  meshidctl inspect --bundle bundle.json --at 2030-01-01T00:00:00Z -o json chain.der`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageErrorf("inspect takes one argument, a file or - for stdin; got %d", len(args))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&bundlePath, "bundle", "", "verify against the roots in this file: PEM or DER certificates, or a SPIFFE bundle (JWKS)")
	cmd.Flags().StringVar(&atFlag, "at", "", "check validity and verify at this time, RFC 3339 (default now)")
	output := outputFlag(cmd)
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		at := time.Now()
		if atFlag != "" {
			t, err := time.Parse(time.RFC3339, atFlag)
			if err != nil {
				return usageErrorf("--at %q: want an RFC 3339 time such as 2030-01-02T15:04:05Z", atFlag)
			}
			at = t
		}
		name, data, err := readInput(args[0], cmd.InOrStdin())
		if err != nil {
			return err
		}
		certs, hasKey, err := decodeChain(data)
		if err != nil {
			return usageErrorf("%s: %w", name, err)
		}
		if err := checkOrder(certs); err != nil {
			return usageErrorf("%s: %w", name, err)
		}
		var roots []*x509.Certificate
		source := "--bundle " + bundlePath
		switch {
		case bundlePath != "":
			if roots, err = loadBundle(bundlePath, trustDomainOf(certs[0])); err != nil {
				return err
			}
		case sf.caFile != "":
			source = "meshid-ca's bundle"
			if roots, err = serverBundle(cmd, &sf); err != nil {
				return err
			}
		}
		report := inspectChain(certs, roots, at)
		report.PrivateKeyPresent = hasKey
		if err := render(cmd.OutOrStdout(), *output, report, report.table); err != nil {
			return err
		}
		if report.Verification.Checked && !report.Verification.Verified {
			return fmt.Errorf("%s does not verify against %s: %s", name, source, report.Verification.Detail)
		}
		return nil
	}
	return cmd
}

// serverBundle asks meshid-ca's admin API for the roots it trusts now.
func serverBundle(cmd *cobra.Command, sf *serverFlags) ([]*x509.Certificate, error) {
	client, ctx, done, err := sf.connect(cmd)
	if err != nil {
		return nil, err
	}
	defer done()
	_, roots, err := bundleRoots(ctx, sf, client)
	return roots, err
}

// readInput reads path, or stdin for "-", and returns the name to use in
// messages.
func readInput(path string, stdin io.Reader) (string, []byte, error) {
	name, r := path, stdin
	if path == "-" {
		name = "stdin"
	} else {
		f, err := os.Open(path)
		if err != nil {
			return name, nil, usageErrorf("%w", err)
		}
		defer f.Close()
		r = f
	}
	data, err := io.ReadAll(io.LimitReader(r, maxInput+1))
	if err != nil {
		return name, nil, usageErrorf("%s: %w", name, err)
	}
	if len(data) > maxInput {
		return name, nil, usageErrorf("%s: more than %d MiB: not a certificate chain", name, maxInput>>20)
	}
	return name, data, nil
}

// loadBundle reads trusted roots: a SPIFFE bundle (JWKS, x5c) if the file
// is JSON, PEM or DER certificates otherwise. td is recorded in a SPIFFE
// bundle only; it does not filter anything.
func loadBundle(path string, td spiffeid.TrustDomain) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, usageErrorf("--bundle: %w", err)
	}
	var roots []*x509.Certificate
	if trimmed := bytes.TrimSpace(data); len(trimmed) > 0 && trimmed[0] == '{' {
		b, err := spiffebundle.Parse(td, trimmed)
		if err != nil {
			return nil, usageErrorf("--bundle %s: %w", path, err)
		}
		roots = b.X509Authorities()
	} else if roots, _, err = decodeChain(data); err != nil {
		return nil, usageErrorf("--bundle %s: %w", path, err)
	}
	if len(roots) == 0 {
		return nil, usageErrorf("--bundle %s: no X.509 authority in the bundle", path)
	}
	return roots, nil
}

// decodeChain reads certificates from PEM or DER data, in the order given.
// PEM blocks other than CERTIFICATE are skipped; hasKey reports a private
// key among them (its bytes are cleared, never returned). DER may be one
// certificate or several concatenated.
func decodeChain(data []byte) (certs []*x509.Certificate, hasKey bool, err error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, false, errors.New("no certificate found: the input is empty")
	}
	if bytes.Contains(data, []byte("-----BEGIN ")) {
		return decodePEM(data)
	}
	certs, err = decodeDER(data)
	return certs, false, err
}

func decodePEM(data []byte) (certs []*x509.Certificate, hasKey bool, err error) {
	var blocks int
	var skipped []string
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		blocks++
		switch {
		case block.Type == "CERTIFICATE":
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, false, fmt.Errorf("PEM certificate %d: %w", len(certs)+1, err)
			}
			certs = append(certs, c)
		case strings.Contains(block.Type, "PRIVATE KEY"):
			hasKey = true
			clear(block.Bytes)
		default:
			skipped = append(skipped, block.Type)
		}
	}
	if blocks == 0 {
		return nil, false, errors.New(`no certificate found: not PEM and not DER (a "-----BEGIN" line but no complete PEM block)`)
	}
	// pem.Decode passes over a malformed or truncated block silently.
	if begins := bytes.Count(data, []byte("-----BEGIN ")); begins > blocks {
		return nil, false, fmt.Errorf("%d of %d PEM blocks are malformed or truncated", begins-blocks, begins)
	}
	if len(certs) == 0 {
		found := strings.Join(skipped, ", ")
		if hasKey {
			found = strings.TrimPrefix(found+", private key (not shown)", ", ")
		}
		return nil, hasKey, fmt.Errorf("no certificate found: no CERTIFICATE block among the PEM blocks (found: %s)", found)
	}
	return certs, hasKey, nil
}

func decodeDER(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for off := 0; off < len(data); {
		n, err := derLength(data[off:])
		switch {
		case err == nil:
		case off == 0 && errors.Is(err, errNotSequence):
			return nil, fmt.Errorf("no certificate found: not PEM and not DER (no \"-----BEGIN\" line, and DER starts with byte 0x30, not 0x%02x)", data[0])
		case off == 0:
			return nil, fmt.Errorf("DER: %w", err)
		default:
			return nil, fmt.Errorf("DER: after certificate %d (byte %d): %w", len(certs), off, err)
		}
		der := data[off : off+n]
		c, err := x509.ParseCertificate(der)
		if err != nil {
			if isPrivateKeyDER(der) {
				return nil, fmt.Errorf("DER item %d is a private key, not a certificate (not shown)", len(certs)+1)
			}
			return nil, fmt.Errorf("DER certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
		off += n
	}
	return certs, nil
}

var errNotSequence = errors.New("not a DER SEQUENCE")

// derLength is the length, header included, of the DER SEQUENCE that b
// starts with; an error if b holds less than that.
func derLength(b []byte) (int, error) {
	if b[0] != 0x30 {
		return 0, errNotSequence
	}
	if len(b) < 2 {
		return 0, errors.New("truncated: 1 byte where a DER header needs 2 or more")
	}
	header, length := 2, uint64(b[1])
	if b[1] >= 0x80 {
		n := int(b[1] & 0x7f)
		if n == 0 || n > 4 {
			return 0, fmt.Errorf("a length of %d bytes is not DER for a certificate", n)
		}
		if len(b) < 2+n {
			return 0, fmt.Errorf("truncated: %d bytes where the DER header needs %d", len(b), 2+n)
		}
		length = 0
		for _, x := range b[2 : 2+n] {
			length = length<<8 | uint64(x)
		}
		header += n
	}
	if total := uint64(header) + length; total > uint64(len(b)) {
		return 0, fmt.Errorf("truncated: the certificate declares %d bytes, %d are there", total, len(b))
	}
	return header + int(length), nil
}

func isPrivateKeyDER(der []byte) bool {
	if _, err := x509.ParsePKCS8PrivateKey(der); err == nil {
		return true
	}
	if _, err := x509.ParseECPrivateKey(der); err == nil {
		return true
	}
	_, err := x509.ParsePKCS1PrivateKey(der)
	return err == nil
}

// checkOrder requires a chain leaf first, each certificate issued by the
// next (names and signature). Certificates that are all self-signed are a
// set of roots (a trust bundle, possibly during a root rotation), not a
// chain, and are accepted in any order.
func checkOrder(certs []*x509.Certificate) error {
	if len(certs) > 1 && allSelfSigned(certs) {
		return nil
	}
	for i := 0; i+1 < len(certs); i++ {
		if err := issuedBy(certs[i], certs[i+1]); err != nil {
			hint := ""
			if inOrder(reversed(certs)) {
				hint = "; the chain is in reverse order (root first): put the leaf first"
			}
			return fmt.Errorf("the certificates are not a chain in order (leaf first, each issued by the next): certificate %d (%s) is not issued by certificate %d (%s): %w%s",
				i+1, describeName(certs[i]), i+2, describeName(certs[i+1]), err, hint)
		}
	}
	return nil
}

func issuedBy(child, parent *x509.Certificate) error {
	if !bytes.Equal(child.RawIssuer, parent.RawSubject) {
		return fmt.Errorf("its issuer is %q", nameOrEmpty(child.Issuer.String()))
	}
	if err := child.CheckSignatureFrom(parent); err != nil {
		return fmt.Errorf("the names match but the signature does not check: %w", err)
	}
	return nil
}

func inOrder(certs []*x509.Certificate) bool {
	for i := 0; i+1 < len(certs); i++ {
		if issuedBy(certs[i], certs[i+1]) != nil {
			return false
		}
	}
	return true
}

func reversed(certs []*x509.Certificate) []*x509.Certificate {
	out := make([]*x509.Certificate, len(certs))
	for i, c := range certs {
		out[len(certs)-1-i] = c
	}
	return out
}

func selfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil
}

func allSelfSigned(certs []*x509.Certificate) bool {
	for _, c := range certs {
		if !selfSigned(c) {
			return false
		}
	}
	return true
}

// describeName names a certificate in messages: its subject, or its SPIFFE
// ID when the subject is empty (as in Istio's leaves), or its serial.
func describeName(c *x509.Certificate) string {
	if s := c.Subject.String(); s != "" {
		return fmt.Sprintf("subject %q", s)
	}
	if id, _ := spiffeIDOf(c); id != "" {
		return id
	}
	return "serial " + c.SerialNumber.Text(16)
}

func nameOrEmpty(s string) string {
	if s == "" {
		return "(empty)"
	}
	return s
}

// chainReport is what inspect shows: the certificates, leaf first, and the
// verification.
type chainReport struct {
	Certificates      []certReport `json:"certificates"`
	PrivateKeyPresent bool         `json:"private_key_present"`
	Verification      verification `json:"verification"`
}

// certReport describes one certificate.
type certReport struct {
	Position           string    `json:"position"` // leaf, intermediate or root
	Subject            string    `json:"subject"`
	Issuer             string    `json:"issuer"`
	SPIFFEID           string    `json:"spiffe_id,omitempty"`
	OtherSANs          []string  `json:"other_sans,omitempty"` // "DNS:…", "IP:…", "URI:…", "email:…"
	Serial             string    `json:"serial"`               // hex
	NotBefore          time.Time `json:"not_before"`
	NotAfter           time.Time `json:"not_after"`
	Status             string    `json:"status"`    // valid, expired or not yet valid, at the time checked
	TimeLeft           string    `json:"time_left"` // "5h3m", or "expired 5m ago"
	Key                string    `json:"key"`       // "ECDSA P-256", "RSA 2048", "Ed25519"
	IsCA               bool      `json:"is_ca"`
	SignatureAlgorithm string    `json:"signature_algorithm"`
	SHA256Fingerprint  string    `json:"sha256_fingerprint"` // hex of the DER's SHA-256
}

// verification is the outcome of verifying the chain against roots.
type verification struct {
	Checked  bool      `json:"checked"`  // roots were given
	Verified bool      `json:"verified"` // the chain verifies to one of them
	At       time.Time `json:"at"`
	Roots    int       `json:"roots"`          // how many roots were trusted
	Root     string    `json:"root,omitempty"` // the root the chain verified to
	Detail   string    `json:"detail"`         // what happened, for people
}

// Validity of a certificate at a time.
const (
	statusValid      = "valid"
	statusExpired    = "expired"
	statusNotYet     = "not yet valid"
	positionLeaf     = "leaf"
	positionInter    = "intermediate"
	positionRoot     = "root"
	noBundleVerified = "not verified (no --bundle given)"
)

// inspectChain describes certs (leaf first, in order: see checkOrder) and
// verifies them against roots at at; no roots, no verification.
func inspectChain(certs []*x509.Certificate, roots []*x509.Certificate, at time.Time) chainReport {
	at = at.UTC()
	r := chainReport{Certificates: make([]certReport, 0, len(certs))}
	bundle := len(certs) > 1 && allSelfSigned(certs)
	for i, c := range certs {
		r.Certificates = append(r.Certificates, describeCert(c, position(c, i, len(certs), bundle), at))
	}
	r.Verification = verify(certs, roots, at, bundle)
	return r
}

func position(c *x509.Certificate, i, n int, bundle bool) string {
	switch {
	case bundle || (i == n-1 && c.IsCA && selfSigned(c)):
		return positionRoot
	case i == 0 && !c.IsCA:
		return positionLeaf
	}
	return positionInter
}

func describeCert(c *x509.Certificate, pos string, at time.Time) certReport {
	id, other := spiffeIDOf(c)
	for _, d := range c.DNSNames {
		other = append(other, "DNS:"+d)
	}
	for _, ip := range c.IPAddresses {
		other = append(other, "IP:"+ip.String())
	}
	for _, e := range c.EmailAddresses {
		other = append(other, "email:"+e)
	}
	status, left := statusValid, timeLeft(c.NotAfter, at)
	switch {
	case at.Before(c.NotBefore):
		status, left = statusNotYet, "not yet valid: starts in "+humanDuration(c.NotBefore.Sub(at))
	case !at.Before(c.NotAfter):
		status = statusExpired
	}
	return certReport{
		Position:           pos,
		Subject:            c.Subject.String(),
		Issuer:             c.Issuer.String(),
		SPIFFEID:           id,
		OtherSANs:          other,
		Serial:             c.SerialNumber.Text(16),
		NotBefore:          c.NotBefore.UTC(),
		NotAfter:           c.NotAfter.UTC(),
		Status:             status,
		TimeLeft:           left,
		Key:                keyDescription(c.PublicKey),
		IsCA:               c.IsCA,
		SignatureAlgorithm: c.SignatureAlgorithm.String(),
		SHA256Fingerprint:  ca.Fingerprint(c),
	}
}

// spiffeIDOf returns the certificate's SPIFFE ID (its first valid spiffe://
// URI SAN) and its other URI SANs.
func spiffeIDOf(c *x509.Certificate) (id string, other []string) {
	for _, u := range c.URIs {
		if id == "" && u.Scheme == "spiffe" {
			if sid, err := spiffeid.FromURI(u); err == nil {
				id = sid.String()
				continue
			}
		}
		other = append(other, "URI:"+u.String())
	}
	return id, other
}

func trustDomainOf(c *x509.Certificate) spiffeid.TrustDomain {
	id, _ := spiffeIDOf(c)
	if sid, err := spiffeid.FromString(id); err == nil {
		return sid.TrustDomain()
	}
	return spiffeid.TrustDomain{}
}

// keyDescription names a public key's type and size: "ECDSA P-256",
// "RSA 2048", "Ed25519".
func keyDescription(pub any) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d", k.N.BitLen())
	case ed25519.PublicKey:
		return "Ed25519"
	case nil:
		return "unknown"
	}
	return fmt.Sprintf("%T", pub)
}

func verify(certs, roots []*x509.Certificate, at time.Time, bundle bool) verification {
	v := verification{At: at, Roots: len(roots)}
	if len(roots) == 0 {
		v.Detail = noBundleVerified
		return v
	}
	v.Checked = true
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	if bundle {
		// A set of roots: each must be trusted (and valid) itself.
		for i, c := range certs {
			if _, err := c.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				v.Detail = fmt.Sprintf("root %d (%s): %s", i+1, describeName(c), verifyReason(err, certs, at))
				return v
			}
		}
		v.Verified = true
		v.Detail = fmt.Sprintf("verified: all %d roots are in the bundle", len(certs))
		return v
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	chains, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   at,
		// SPIFFE leaves are for clients and servers alike.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		v.Detail = verifyReason(err, certs, at)
		return v
	}
	root := chains[0][len(chains[0])-1]
	v.Verified = true
	v.Root = root.Subject.String()
	v.Detail = fmt.Sprintf("verified to root %q", nameOrEmpty(v.Root))
	return v
}

// verifyReason explains a verification error, naming which certificate is
// out of its validity window when that is the reason (crypto/x509 does
// not say which).
func verifyReason(err error, certs []*x509.Certificate, at time.Time) string {
	var invalid x509.CertificateInvalidError
	if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
		for i, c := range certs {
			switch {
			case at.Before(c.NotBefore):
				return fmt.Sprintf("certificate %d (%s) is not valid until %s, %s after the time checked", i+1, describeName(c), timestamp(c.NotBefore), humanDuration(c.NotBefore.Sub(at)))
			case at.After(c.NotAfter):
				return fmt.Sprintf("certificate %d (%s) expired at %s, %s before the time checked", i+1, describeName(c), timestamp(c.NotAfter), humanDuration(at.Sub(c.NotAfter)))
			}
		}
	}
	return err.Error()
}

// table writes a kubectl describe-like block per certificate, then the
// verification.
func (r chainReport) table(w io.Writer) error {
	var b strings.Builder
	for i, c := range r.Certificates {
		fmt.Fprintf(&b, "Certificate %d of %d: %s\n", i+1, len(r.Certificates), c.Position)
		isCA := "no"
		if c.IsCA {
			isCA = "yes"
		}
		writeFields(&b, "  ", [][2]string{
			{"Subject", nameOrEmpty(c.Subject)},
			{"Issuer", nameOrEmpty(c.Issuer)},
			{"SPIFFE ID", orDash(c.SPIFFEID)},
			{"Other SANs", orDash(strings.Join(c.OtherSANs, ", "))},
			{"Serial", c.Serial},
			{"Not Before", timestamp(c.NotBefore)},
			{"Not After", timestamp(c.NotAfter)},
			{"Time Left", c.TimeLeft},
			{"Key", c.Key},
			{"CA", isCA},
			{"Signature Algorithm", c.SignatureAlgorithm},
			{"SHA-256 Fingerprint", c.SHA256Fingerprint},
		})
		b.WriteString("\n")
	}
	fields := [][2]string{}
	if r.PrivateKeyPresent {
		fields = append(fields, [2]string{"Private Key", "private key present (not shown)"})
	}
	detail := r.Verification.Detail
	if r.Verification.Checked {
		state := "FAILED: "
		if r.Verification.Verified {
			state = ""
		}
		detail = fmt.Sprintf("%s%s (trusted roots: %d; at %s)", state, detail, r.Verification.Roots, timestamp(r.Verification.At))
	}
	fields = append(fields, [2]string{"Verification", detail})
	writeFields(&b, "", fields)
	_, err := io.WriteString(w, b.String())
	return err
}

// writeFields writes "Key:   value" lines with the values aligned.
func writeFields(b *strings.Builder, indent string, fields [][2]string) {
	width := 0
	for _, f := range fields {
		width = max(width, len(f[0]))
	}
	for _, f := range fields {
		fmt.Fprintf(b, "%s%-*s  %s\n", indent, width+1, f[0]+":", f[1])
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
