package distribute

import (
	"crypto"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultRefreshHint is how often a federated trust domain is told to
// fetch the bundle again: soon enough that a new root (a root rotation's
// first stage) reaches it long before it signs anything.
const DefaultRefreshHint = 5 * time.Minute

// BundleSource is the trust domain's current roots as a SPIFFE bundle, for
// go-spiffe's federation.NewHandler: what a SPIFFE bundle endpoint serves
// to other trust domains that federate with this one.
type BundleSource struct {
	TrustDomain spiffeid.TrustDomain
	Roots       Roots
	// JWTAuthorities gives the JWT-SVID keys to publish, by kid; nil:
	// none.
	JWTAuthorities func() map[string]crypto.PublicKey
	RefreshHint    time.Duration // default DefaultRefreshHint
}

// GetBundleForTrustDomain returns the bundle of the source's own trust
// domain; any other is an error.
func (b BundleSource) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td != b.TrustDomain {
		return nil, fmt.Errorf("distribute: no bundle for trust domain %q (this is %q)", td, b.TrustDomain)
	}
	roots := b.Roots()
	if len(roots) == 0 {
		return nil, errors.New("distribute: no CA loaded yet")
	}
	bundle := spiffebundle.FromX509Authorities(td, roots)
	if b.JWTAuthorities != nil {
		for kid, key := range b.JWTAuthorities() {
			if err := bundle.AddJWTAuthority(kid, key); err != nil {
				return nil, fmt.Errorf("distribute: JWT authority %s: %w", kid, err)
			}
		}
	}
	hint := b.RefreshHint
	if hint <= 0 {
		hint = DefaultRefreshHint
	}
	bundle.SetRefreshHint(hint)
	return bundle, nil
}

// MaxEndpointHeaderBytes bounds a bundle request's headers: a federating
// client sends a GET line and a few short headers.
const MaxEndpointHeaderBytes = 8 << 10

// NewEndpointServer is the HTTPS server of a bundle endpoint. The endpoint
// faces other trust domains, often across the internet, so every phase of
// a connection is bounded: the TLS handshake and headers (10 s), the
// answer (10 s), an idle keep-alive connection (60 s), and the headers'
// size, so slow or idle clients cannot pile up connections and memory.
func NewEndpointServer(h http.Handler, getCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)) *http.Server {
	return &http.Server{
		Handler:           h,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: getCertificate},
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    MaxEndpointHeaderBytes,
	}
}
