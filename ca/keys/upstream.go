package keys

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Upstream is a CA above meshid's (step-ca, *stepca.Client) that signs its
// intermediates: Sign returns the certificate for csrDER and the chain
// above it, without the root.
type Upstream interface {
	Sign(ctx context.Context, csrDER []byte, notAfter time.Time) (*x509.Certificate, []*x509.Certificate, error)
}

// UpstreamCA is where meshid's intermediate comes from when the root is
// someone else's: the upstream, its root, and what to ask it for.
type UpstreamCA struct {
	Upstream    Upstream
	Root        *x509.Certificate
	TrustDomain spiffeid.TrustDomain
	Algorithm   Algorithm
	TTL         time.Duration
	// Key, when set, is the intermediate's key in a KMS or HSM, certified
	// anew at each renewal; otherwise each intermediate gets a new key.
	Key *External
}

// ErrUpstreamIntermediate marks an intermediate the upstream signed that
// meshid will not sign with.
var ErrUpstreamIntermediate = errors.New("keys: the upstream's intermediate is not fit for the mesh")

// Intermediate makes a new key, has the upstream sign it as an
// intermediate valid for TTL from now, and returns the CA it makes, after
// checking it: a CA of path length 0, able to sign certificates, name
// constrained to the trust domain, chaining to Root with room for
// workload certificates under it (a workload certificate made with the new
// key must verify to Root).
func (u *UpstreamCA) Intermediate(ctx context.Context, now time.Time) (*Material, error) {
	var key crypto.Signer
	if u.Key != nil {
		key = u.Key.Signer
	} else {
		var err error
		if key, err = GenerateKey(u.Algorithm); err != nil {
			return nil, err
		}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "meshid intermediate CA"},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("keys: intermediate request: %w", err)
	}
	cert, chain, err := u.Upstream.Sign(ctx, csr, now.Add(u.TTL))
	if err != nil {
		return nil, err
	}
	// The chain step-ca sends may end with the root; the root goes in
	// Roots only.
	chain = slices.DeleteFunc(slices.Clone(chain), func(c *x509.Certificate) bool { return c.Equal(u.Root) })
	m := &Material{CACert: cert, CAKey: key, Chain: chain, Roots: []*x509.Certificate{u.Root}}
	if u.Key != nil {
		m.KeyURI = u.Key.URI
	}
	if err := u.check(m, now); err != nil {
		return nil, err
	}
	return m, nil
}

func (u *UpstreamCA) check(m *Material, now time.Time) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrUpstreamIntermediate, fmt.Sprintf(format, args...))
	}
	c := m.CACert
	td := u.TrustDomain.String()
	switch {
	case !publicKeyEqual(c.PublicKey, m.CAKey.Public()):
		return bad("it certifies another key")
	case !c.BasicConstraintsValid || !c.IsCA:
		return bad("it is not a CA certificate (the provisioner's X.509 template must set basicConstraints isCA)")
	case c.MaxPathLen != 0 || !c.MaxPathLenZero:
		return bad("its path length is not 0 (the template must set maxPathLen 0: meshid signs only workloads)")
	case c.KeyUsage&x509.KeyUsageCertSign == 0:
		return bad("its key usage lacks certSign")
	case len(c.PermittedURIDomains) != 1 || c.PermittedURIDomains[0] != td || !c.PermittedDNSDomainsCritical:
		return bad("it is not name constrained to URIs of %s, critically (permitted URI domains %v): the template must set nameConstraints for the trust domain", td, c.PermittedURIDomains)
	case !c.NotAfter.After(now):
		return bad("it expired at %s", c.NotAfter.UTC())
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(u.Root)
	for _, p := range m.Chain {
		inter.AddCert(p)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return bad("it does not chain to the configured root: %v", err)
	}
	// A workload certificate under it must verify too: path lengths above
	// (a `step ca init` PKI leaves no room for a CA under step-ca's) and
	// the name constraints are only seen that way.
	probe := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		URIs:         []*url.URL{spiffeid.RequireFromPath(u.TrustDomain, "/ns/meshid-probe/sa/probe").URL()},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if probe.NotAfter.After(c.NotAfter) {
		probe.NotAfter = c.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, probe, c, m.CAKey.Public(), m.CAKey)
	if err != nil {
		return bad("signing a workload certificate with it: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return bad("%v", err)
	}
	inter.AddCert(c)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return bad("a workload certificate under it does not verify (%v): each CA above it must allow a path length of at least 1 more", err)
	}
	return nil
}

// renewAt is when m's intermediate is replaced: a third of its lifetime
// before it, or anything above it short of the root, lapses.
func renewAt(m *Material) time.Time {
	end := m.CACert.NotAfter
	for _, c := range m.Chain {
		if c.NotAfter.Before(end) {
			end = c.NotAfter
		}
	}
	return end.Add(-end.Sub(m.CACert.NotBefore) / 3)
}
