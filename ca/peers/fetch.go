package peers

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// MaxBundleBytes bounds a fetched bundle: a peer's endpoint is outside the
// mesh, and a bundle of a few roots and keys is a few kilobytes.
const MaxBundleBytes = 1 << 20

// FetchTimeout bounds one fetch, connection to last byte.
const FetchTimeout = 30 * time.Second

// Fetch gets p's bundle from its endpoint. trust is the peer's bundle held
// now (for https_spiffe, what the endpoint's SVID is verified against).
func Fetch(ctx context.Context, p Peer, trust *spiffebundle.Bundle) (*spiffebundle.Bundle, error) {
	tc, err := tlsConfig(p, trust)
	if err != nil {
		return nil, err
	}
	client := &http.Client{
		Transport: &http.Transport{TLSClientConfig: tc, TLSHandshakeTimeout: 10 * time.Second, ResponseHeaderTimeout: 10 * time.Second, DisableKeepAlives: true},
		Timeout:   FetchTimeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return errors.New("redirects are not followed") // the spec has none; a redirect could leave the authenticated host
		},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL, http.NoBody)
	if err != nil {
		return nil, fmt.Errorf("peers: %s: %w", p.TrustDomain, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("peers: fetching %s's bundle: %w", p.TrustDomain, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("peers: fetching %s's bundle: %s answered %s", p.TrustDomain, p.URL, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxBundleBytes+1))
	if err != nil {
		return nil, fmt.Errorf("peers: reading %s's bundle: %w", p.TrustDomain, err)
	}
	if len(data) > MaxBundleBytes {
		return nil, fmt.Errorf("peers: %s's bundle is larger than %d bytes", p.TrustDomain, MaxBundleBytes)
	}
	return ParseBundle(p.TrustDomain, data)
}

// ParseBundle parses a peer's bundle document (untrusted bytes): a SPIFFE
// bundle of td with at least one X.509 authority.
func ParseBundle(td spiffeid.TrustDomain, data []byte) (*spiffebundle.Bundle, error) {
	b, err := spiffebundle.Parse(td, data)
	if err != nil {
		return nil, fmt.Errorf("peers: %s's bundle: %w", td, err)
	}
	if len(b.X509Authorities()) == 0 {
		return nil, fmt.Errorf("peers: %s's bundle holds no X.509 authority", td)
	}
	return b, nil
}

func tlsConfig(p Peer, trust *spiffebundle.Bundle) (*tls.Config, error) {
	switch p.Profile {
	case HTTPSWeb:
		return &tls.Config{RootCAs: p.WebRoots, MinVersion: tls.VersionTLS12}, nil
	case HTTPSSPIFFE:
		if trust == nil {
			trust = p.Bootstrap
		}
		if trust == nil {
			return nil, fmt.Errorf("peers: %s: no bundle to authenticate its endpoint with", p.TrustDomain)
		}
		var src x509bundle.Source = trust.X509Bundle()
		tc := tlsconfig.TLSClientConfig(src, tlsconfig.AuthorizeID(p.EndpointID))
		tc.MinVersion = tls.VersionTLS12
		return tc, nil
	}
	return nil, fmt.Errorf("peers: %s: unknown profile %q", p.TrustDomain, p.Profile)
}
