package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
)

// DefaultServingTTL is the lifetime of the CA's own TLS certificate.
const DefaultServingTTL = 24 * time.Hour

// ServingCertificate is the CA's own TLS certificate, issued by the CA itself
// and renewed at half its life or as soon as the issuer changes (a plug-in CA
// reload), on the first handshake that notices.
type ServingCertificate struct {
	Authority *ca.Authority
	Issuers   ca.IssuerSource
	DNSNames  []string
	// ID, when set, makes it an X.509 SVID for ID instead of a certificate
	// for DNSNames: what a SPIFFE bundle endpoint with SPIFFE
	// authentication (https_spiffe) presents.
	ID  spiffeid.ID
	TTL time.Duration    // 0 means DefaultServingTTL
	Now func() time.Time // nil means time.Now

	mu      sync.Mutex
	cur     *tls.Certificate
	issuer  *ca.Issuer
	renewAt time.Time
}

// GetCertificate is for tls.Config.GetCertificate.
func (s *ServingCertificate) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.Certificate()
}

// Certificate returns the current certificate, renewing it when due.
func (s *ServingCertificate) Certificate() (*tls.Certificate, error) {
	now := time.Now()
	if s.Now != nil {
		now = s.Now()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil && s.issuer == s.Issuers.Issuer() && now.Before(s.renewAt) {
		return s.cur, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("server: serving key: %w", err)
	}
	ttl := s.TTL
	if ttl == 0 {
		ttl = DefaultServingTTL
	}
	var cert *ca.Certificate
	if s.ID.IsZero() {
		cert, err = s.Authority.IssueServing(key.Public(), s.DNSNames, ttl)
	} else {
		cert, err = s.Authority.Issue(ca.Request{ID: s.ID, PublicKey: key.Public(), TTL: ttl})
	}
	if err != nil {
		if s.cur != nil && now.Before(s.cur.Leaf.NotAfter) {
			return s.cur, nil // keep serving the one we have
		}
		return nil, fmt.Errorf("server: issuing serving certificate: %w", err)
	}
	tc := &tls.Certificate{PrivateKey: key, Leaf: cert.Leaf}
	tc.Certificate = append(tc.Certificate, cert.Leaf.Raw)
	chain := cert.Issuer.Chain()
	for _, c := range chain[:len(chain)-1] { // the root is the client's to have
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	if len(chain) == 1 {
		tc.Certificate = append(tc.Certificate, chain[0].Raw)
	}
	s.cur, s.issuer = tc, cert.Issuer
	s.renewAt = cert.Leaf.NotBefore.Add(cert.Leaf.NotAfter.Sub(cert.Leaf.NotBefore) / 2)
	return tc, nil
}
