// Package catest is meshid's real signing path in process, for tests of the
// agent and SDS: no gRPC, and the token is taken to be the caller's SPIFFE
// ID (authentication is tested elsewhere, against real parts).
package catest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/csr"
	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/ca/keys"
)

// CA signs like meshid-ca, and can be switched off.
type CA struct {
	// Identify maps a token to the caller's identity; by default the token
	// is the SPIFFE ID itself.
	Identify func(token string) (spiffeid.ID, error)

	authority *ca.Authority
	root      *x509.Certificate
	jwt       *jwtsvid.Keys
	jwtOnce   sync.Once
	jwtErr    error
	mu        sync.Mutex
	down      bool
	calls     int
}

// New makes a CA with a fresh ECDSA root and intermediate, valid from now
// (in a synctest bubble: the bubble's now).
func New(t testing.TB) *CA {
	t.Helper()
	return NewIn(t, "cluster.local")
}

// NewIn makes a CA of trust domain td (a federated peer's, say).
func NewIn(t testing.TB, td string) *CA {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: td, Algorithm: keys.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	is, err := m.Issuer(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var src keys.Source
	src.Set(is)
	a, err := ca.New(ca.Config{Issuers: &src, DefaultTTL: time.Hour, MaxTTL: 24 * time.Hour, Backdate: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	jwtKeys, err := jwtsvid.New(jwtsvid.Config{
		Store:  &jwtsvid.File{Path: filepath.Join(t.TempDir(), "jwt-keys.json")},
		Policy: jwtsvid.Policy{Rotation: 24 * time.Hour, MaxTTL: time.Hour},
	})
	if err != nil {
		t.Fatal(err)
	}
	return &CA{authority: a, root: is.Root(), jwt: jwtKeys}
}

// jwtKeys are the CA's JWT keys, made on first use: most tests of the
// agent never ask for a JWT-SVID.
func (c *CA) jwtKeys() (*jwtsvid.Keys, error) {
	c.jwtOnce.Do(func() { c.jwtErr = c.jwt.Sync(context.Background()) })
	return c.jwt, c.jwtErr
}

// JWTAuthorities are the CA's JWT-SVID keys, by kid.
func (c *CA) JWTAuthorities() map[string]crypto.PublicKey {
	k, err := c.jwtKeys()
	if err != nil {
		panic(err) // a temporary directory that cannot be written
	}
	return k.Published()
}

// SignJWT signs a JWT-SVID for the SPIFFE ID in token, as MintJWTSVID
// does.
func (c *CA) SignJWT(token string, audience []string) (*jwtsvid.SVID, error) {
	id, err := c.caller(token)
	if err != nil {
		return nil, err
	}
	k, err := c.jwtKeys()
	if err != nil {
		return nil, err
	}
	s, err := k.Sign(id, audience, 0)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return s, nil
}

// caller counts a request and says who token proves, or why not.
func (c *CA) caller(token string) (spiffeid.ID, error) {
	c.mu.Lock()
	c.calls++
	down := c.down
	c.mu.Unlock()
	if down {
		return spiffeid.ID{}, status.Error(codes.Unavailable, "ca down")
	}
	identify := c.Identify
	if identify == nil {
		identify = spiffeid.FromString
	}
	id, err := identify(token)
	if err != nil {
		return spiffeid.ID{}, status.Error(codes.Unauthenticated, "bad token")
	}
	return id, nil
}

// IssueFor signs a fresh P-256 key's certificate for id, an hour long,
// and returns the chain (leaf first, root last) and the key.
func (c *CA) IssueFor(t testing.TB, id spiffeid.ID) ([]*x509.Certificate, crypto.Signer) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := c.issue(ca.Request{ID: id, PublicKey: key.Public(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return chain, key
}

// Root is the CA's root.
func (c *CA) Root() *x509.Certificate { return c.root }

// SetDown makes every request fail with Unavailable, or not.
func (c *CA) SetDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
}

// Calls counts the requests so far.
func (c *CA) Calls() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls
}

// Sign issues a certificate for the SPIFFE ID in token, leaf first and root
// last, as CreateCertificate answers.
func (c *CA) Sign(ctx context.Context, csrPEM []byte, token string, ttl time.Duration) ([]*x509.Certificate, error) {
	id, err := c.caller(token)
	if err != nil {
		return nil, err
	}
	pub, err := csr.Validate(csrPEM, id)
	if err != nil {
		return nil, status.Error(codes.PermissionDenied, err.Error())
	}
	return c.issue(ca.Request{ID: id, PublicKey: pub, TTL: ttl})
}

// issue signs req and returns the chain, leaf first and root last.
func (c *CA) issue(req ca.Request) ([]*x509.Certificate, error) {
	cert, err := c.authority.Issue(req)
	if err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	for _, p := range cert.ChainPEM {
		certs, err := ca.ParseCertificatesPEM([]byte(p))
		if err != nil {
			return nil, err
		}
		chain = append(chain, certs...)
	}
	return chain, nil
}
