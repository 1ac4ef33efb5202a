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
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
)

// Upstream is a CA above meshid's (step-ca, *stepca.Client) that signs its
// intermediates: Sign returns the certificate for csrDER and the chain
// above it, without the root.
type Upstream interface {
	Sign(ctx context.Context, csrDER []byte, notAfter time.Time) (*x509.Certificate, []*x509.Certificate, error)
}

// UpstreamCA is where meshid's intermediate comes from when the root is
// someone else's: the upstream, its roots, and what to ask it for.
type UpstreamCA struct {
	Upstream Upstream
	// Roots are the upstream's roots meshid trusts and serves as the
	// mesh's bundle (--step-root-file): the one its intermediates chain to
	// and, while the upstream's operators rotate it, the next one.
	Roots []*x509.Certificate
	// An intermediate under a root other than the current intermediate's
	// is used only once that root has been in the bundle meshid serves for
	// Propagation (kubelets refresh mounted ConfigMaps late), counted from
	// Since, when this process started serving Roots. A restart only delays
	// the switch.
	Propagation time.Duration
	Since       time.Time
	TrustDomain spiffeid.TrustDomain
	Algorithm   Algorithm
	TTL         time.Duration
	// Key, when set, is the intermediate's key in a KMS or HSM, certified
	// anew at each renewal; otherwise each intermediate gets a new key.
	Key *External

	mu sync.Mutex // guards Roots and Since after SetRoots
}

// state is Roots and Since, read together.
func (u *UpstreamCA) state() ([]*x509.Certificate, time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.Roots), u.Since
}

// SetRoots replaces the upstream's roots (--step-root-file read again) and
// says whether they changed. A root not there before restarts the
// propagation clock at now: the bundle with it is served from now on.
func (u *UpstreamCA) SetRoots(roots []*x509.Certificate, now time.Time) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	added := false
	for _, r := range roots {
		if !slices.ContainsFunc(u.Roots, r.Equal) {
			added = true
		}
	}
	if !added && len(roots) == len(u.Roots) {
		return false
	}
	if added {
		u.Since = now
	}
	u.Roots = slices.Clone(roots)
	return true
}

// ErrUpstreamIntermediate marks an intermediate the upstream signed that
// meshid will not sign with.
var ErrUpstreamIntermediate = errors.New("keys: the upstream's intermediate is not fit for the mesh")

// ErrRootNotPropagated marks an intermediate under a new upstream root
// that the workloads may not trust yet: tried again later.
var ErrRootNotPropagated = errors.New("keys: the upstream now signs under a root the mesh may not trust yet")

// Intermediate makes a new key, has the upstream sign it as an
// intermediate valid for TTL from now, and returns the CA it makes, after
// checking it: a CA of path length 0, able to sign certificates, name
// constrained to the trust domain, chaining to Root with room for
// workload certificates under it (a workload certificate made with the new
// key must verify to Root).
//
// current is the CA in use (nil on first start): an intermediate that
// chains to another root than current's is refused with
// ErrRootNotPropagated until that root has been served for Propagation.
func (u *UpstreamCA) Intermediate(ctx context.Context, now time.Time, current *Material) (*Material, error) {
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
	upstreamRoots, since := u.state()
	// The chain step-ca sends may end with a root; roots go in Roots only.
	chain = slices.DeleteFunc(slices.Clone(chain), func(c *x509.Certificate) bool { return slices.ContainsFunc(upstreamRoots, c.Equal) })
	m := &Material{CACert: cert, CAKey: key, Chain: chain, Roots: upstreamRoots}
	if u.Key != nil {
		m.KeyURI = u.Key.URI
	}
	root, err := u.check(m, upstreamRoots, now)
	if err != nil {
		return nil, err
	}
	if current != nil {
		if was := chainRoot(current, append(slices.Clone(upstreamRoots), current.Roots...)); was == nil || !was.Equal(root) {
			if served := now.Sub(since); served < u.Propagation {
				return nil, fmt.Errorf("%w: root %s has been in the served bundle for %s of --root-propagation %s", ErrRootNotPropagated,
					ca.Fingerprint(root), served.Round(time.Second), u.Propagation)
			}
		}
	}
	return m, nil
}

// Bundle is what m serves as the mesh's trust bundle: the upstream's roots,
// and the root m's own intermediate chains to if they lack it (taken out
// of --step-root-file too early: dropping it would break every workload).
func (u *UpstreamCA) Bundle(m *Material) []*x509.Certificate {
	roots, _ := u.state()
	if r := chainRoot(m, append(slices.Clone(roots), m.Roots...)); r != nil && !slices.ContainsFunc(roots, r.Equal) {
		roots = append(roots, r)
	}
	return roots
}

// chainRoot is the root among roots that m's intermediate chains to.
func chainRoot(m *Material, roots []*x509.Certificate) *x509.Certificate {
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range m.Chain {
		inter.AddCert(c)
	}
	chains, err := m.CACert.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: m.CACert.NotBefore.Add(time.Second), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil || len(chains) == 0 {
		return nil
	}
	return chains[0][len(chains[0])-1]
}

func (u *UpstreamCA) check(m *Material, upstreamRoots []*x509.Certificate, now time.Time) (*x509.Certificate, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrUpstreamIntermediate, fmt.Sprintf(format, args...))
	}
	c := m.CACert
	td := u.TrustDomain.String()
	switch {
	case !publicKeyEqual(c.PublicKey, m.CAKey.Public()):
		return nil, bad("it certifies another key")
	case !c.BasicConstraintsValid || !c.IsCA:
		return nil, bad("it is not a CA certificate (the provisioner's X.509 template must set basicConstraints isCA)")
	case c.MaxPathLen != 0 || !c.MaxPathLenZero:
		return nil, bad("its path length is not 0 (the template must set maxPathLen 0: meshid signs only workloads)")
	case c.KeyUsage&x509.KeyUsageCertSign == 0:
		return nil, bad("its key usage lacks certSign")
	case len(c.PermittedURIDomains) != 1 || c.PermittedURIDomains[0] != td || !c.PermittedDNSDomainsCritical:
		return nil, bad("it is not name constrained to URIs of %s, critically (permitted URI domains %v): the template must set nameConstraints for the trust domain", td, c.PermittedURIDomains)
	case !c.NotAfter.After(now):
		return nil, bad("it expired at %s", c.NotAfter.UTC())
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range upstreamRoots {
		roots.AddCert(r)
	}
	for _, p := range m.Chain {
		inter.AddCert(p)
	}
	chains, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return nil, bad("it does not chain to a configured root: %v", err)
	}
	root := chains[0][len(chains[0])-1]
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
		return nil, bad("signing a workload certificate with it: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, bad("%v", err)
	}
	inter.AddCert(c)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, bad("a workload certificate under it does not verify (%v): each CA above it must allow a path length of at least 1 more", err)
	}
	return root, nil
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
