package ca

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults from docs/design.md.
const (
	DefaultTTL      = time.Hour
	DefaultMaxTTL   = 24 * time.Hour
	DefaultBackdate = time.Minute
)

// IssuerSource gives the issuer to sign with now. Implementations swap it
// atomically on reload; a request keeps the issuer it started with.
type IssuerSource interface {
	Issuer() *Issuer
}

// Config configures an [Authority]. Zero durations take the defaults.
type Config struct {
	Issuers    IssuerSource
	DefaultTTL time.Duration    // when the request asks for none
	MaxTTL     time.Duration    // longer requests are clamped to it
	Backdate   time.Duration    // NotBefore this far in the past, for clock skew
	Now        func() time.Time // nil means time.Now
}

// Authority signs workload certificates.
type Authority struct {
	issuers    IssuerSource
	defaultTTL time.Duration
	maxTTL     time.Duration
	backdate   time.Duration
	now        func() time.Time
}

// New returns an Authority after checking cfg.
func New(cfg Config) (*Authority, error) {
	a := &Authority{
		issuers:    cfg.Issuers,
		defaultTTL: cfg.DefaultTTL,
		maxTTL:     cfg.MaxTTL,
		backdate:   cfg.Backdate,
		now:        cfg.Now,
	}
	if a.issuers == nil {
		return nil, errorf("config needs an issuer source")
	}
	if a.defaultTTL == 0 {
		a.defaultTTL = DefaultTTL
	}
	if a.maxTTL == 0 {
		a.maxTTL = DefaultMaxTTL
	}
	if a.backdate == 0 {
		a.backdate = DefaultBackdate
	}
	if a.now == nil {
		a.now = time.Now
	}
	switch {
	case a.defaultTTL < 0 || a.maxTTL < 0 || a.backdate < 0:
		return nil, errorf("durations must not be negative")
	case a.defaultTTL > a.maxTTL:
		return nil, errorf("default TTL %s exceeds max TTL %s", a.defaultTTL, a.maxTTL)
	}
	return a, nil
}

// Request is what to sign: an authenticated identity and the key it proved it
// holds.
type Request struct {
	ID        spiffeid.ID
	PublicKey crypto.PublicKey
	TTL       time.Duration // 0 asks for the default; above the max is clamped
}

// Certificate is a signed leaf with its chain.
type Certificate struct {
	Leaf   *x509.Certificate
	Issuer *Issuer // the issuer that signed it

	// ChainPEM is the CreateCertificate answer: the leaf, then one PEM
	// certificate per intermediate, then every trusted root in one element,
	// the root the chain ends in first.
	ChainPEM []string
}

// TTL returns the lifetime a request for ttl gets: the default for zero,
// clamped to the maximum. Negative is an error.
func (a *Authority) TTL(ttl time.Duration) (time.Duration, error) {
	switch {
	case ttl < 0:
		return 0, fmt.Errorf("%w: negative TTL", ErrInvalidRequest)
	case ttl == 0:
		return a.defaultTTL, nil
	case ttl > a.maxTTL:
		return a.maxTTL, nil
	}
	return ttl, nil
}

// Backdate is how far before now a certificate's NotBefore is set: its
// lifetime is its TTL plus this.
func (a *Authority) Backdate() time.Duration { return a.backdate }

// Issue signs a workload certificate for req.ID and re-validates it.
func (a *Authority) Issue(req Request) (*Certificate, error) {
	if req.ID.IsZero() {
		return nil, fmt.Errorf("%w: empty SPIFFE ID", ErrInvalidRequest)
	}
	ttl, err := a.TTL(req.TTL)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		URIs:                  []*url.URL{req.ID.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if _, ok := req.PublicKey.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	return a.sign(tmpl, req.PublicKey, ttl, func(leaf *x509.Certificate) error {
		return checkWorkloadLeaf(leaf, req.ID)
	})
}

// IssueServing signs a TLS server certificate for the CA's own endpoints,
// for names: DNS names, and IP addresses as IP SANs.
func (a *Authority) IssueServing(pub crypto.PublicKey, names []string, ttl time.Duration) (*Certificate, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("%w: serving certificate needs DNS names", ErrInvalidRequest)
	}
	var dnsNames []string
	var ips []net.IP
	for _, n := range names {
		// An IP address goes in as one, so that a client dialing
		// 127.0.0.1 verifies the name it dialed.
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
			continue
		}
		dnsNames = append(dnsNames, n)
	}
	tmpl := &x509.Certificate{
		DNSNames:              dnsNames,
		IPAddresses:           ips,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	return a.sign(tmpl, pub, ttl, checkServingLeaf)
}

func (a *Authority) sign(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration, check func(*x509.Certificate) error) (*Certificate, error) {
	is := a.issuers.Issuer()
	if is == nil {
		return nil, ErrNoIssuer
	}
	now := a.now()
	if !now.Before(is.notAfter) {
		return nil, errorf("issuer expired at %s", is.notAfter.UTC().Format(time.RFC3339))
	}
	tmpl.NotBefore = now.Add(-a.backdate)
	if tmpl.NotBefore.Before(is.notBefore) {
		tmpl.NotBefore = is.notBefore
	}
	tmpl.NotAfter = now.Add(ttl)
	if tmpl.NotAfter.After(is.notAfter) {
		tmpl.NotAfter = is.notAfter
	}
	serial, err := newSerial(now)
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	// x509.CreateCertificate sets the AKI from the issuer's SKI and checks
	// the signature it made, so that check is not repeated below.
	der, err := x509.CreateCertificate(rand.Reader, tmpl, is.cert, pub, is.signer)
	if err != nil {
		return nil, errorf("signing: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, errorf("parsing what was signed: %w", err)
	}
	if err := validateLeaf(leaf, pub, is, now); err != nil {
		return nil, err
	}
	if err := check(leaf); err != nil {
		return nil, err
	}
	chain := make([]string, 0, 1+len(is.chainPEM))
	chain = append(chain, string(EncodePEM(leaf)))
	chain = append(chain, is.chainPEM[:len(is.chainPEM)-1]...)
	chain = append(chain, trustBundlePEM(is))
	return &Certificate{Leaf: leaf, ChainPEM: chain, Issuer: is}, nil
}

// trustBundlePEM is the last element of a response: every trusted root, as
// istiod sends its whole root-cert.pem, because Istio's agent takes that
// element verbatim as its ROOTCA and must trust old and new roots during a
// rotation. The root this chain ends in comes first, for clients that read
// only the first certificate there; with one root it is that root's PEM,
// byte for byte. Encoded once per issuer, not per request.
func trustBundlePEM(is *Issuer) string { return is.bundlePEM }

// newSerial is a certificate serial number: the time of issue in
// milliseconds (48 bits), then 80 random bits. Randomness beyond the CA/B
// Forum's 64 bits keeps serials unguessable and unique across replicas;
// the time prefix makes each new serial sort after the last, so the
// ledger's serial index grows at its end (one page written per commit)
// instead of at a random place (one page per certificate).
func newSerial(now time.Time) (*big.Int, error) {
	var b [16]byte
	ms := uint64(now.UnixMilli())
	for i := 5; i >= 0; i-- {
		b[i] = byte(ms)
		ms >>= 8
	}
	if _, err := rand.Read(b[6:]); err != nil {
		return nil, errorf("serial: %w", err)
	}
	return new(big.Int).SetBytes(b[:]), nil
}
