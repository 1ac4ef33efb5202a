package peers

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"
)

// Profile is how a bundle endpoint is authenticated.
type Profile string

const (
	// HTTPSWeb: the endpoint's certificate chains to Web PKI roots (the
	// system's, or RootsFile's).
	HTTPSWeb Profile = "https_web"
	// HTTPSSPIFFE: the endpoint presents an X.509-SVID of EndpointID,
	// verified against the peer's own bundle (the bootstrap one at first,
	// then the last fetched).
	HTTPSSPIFFE Profile = "https_spiffe"
)

// Peer is one trust domain meshid federates with.
type Peer struct {
	TrustDomain spiffeid.TrustDomain
	URL         string
	Profile     Profile
	EndpointID  spiffeid.ID          // https_spiffe
	Bootstrap   *spiffebundle.Bundle // https_spiffe: trusted until the first fetch
	WebRoots    *x509.CertPool       // https_web: nil means the system's
}

// file is the configuration file: a list in the shape of the spec of
// SPIRE's ClusterFederatedTrustDomain, so that users can copy theirs.
type file struct {
	FederatesWith []struct {
		TrustDomain           string `json:"trustDomain"`
		BundleEndpointURL     string `json:"bundleEndpointURL"`
		BundleEndpointProfile struct {
			Type             string `json:"type"`
			EndpointSPIFFEID string `json:"endpointSPIFFEID"`
		} `json:"bundleEndpointProfile"`
		TrustDomainBundle string `json:"trustDomainBundle"`
		// RootsFile: https_web's roots instead of the system's (PEM).
		RootsFile string `json:"rootsFile"`
	} `json:"federatesWith"`
}

// ParseConfig reads the federation file (YAML or JSON) of a CA of trust
// domain own. Every error is reported, each with the entry it is in.
//
//	federatesWith:
//	- trustDomain: spire.example
//	  bundleEndpointURL: https://spire.example:8443
//	  bundleEndpointProfile:
//	    type: https_spiffe
//	    endpointSPIFFEID: spiffe://spire.example/spire/server
//	  trustDomainBundle: '{"keys": [...]}'   # the peer's bundle, to start from
func ParseConfig(data []byte, own spiffeid.TrustDomain) ([]Peer, error) {
	var f file
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("peers: config: %w", err)
	}
	var errs []error
	seen := map[spiffeid.TrustDomain]bool{}
	var peers []Peer
	for i, e := range f.FederatesWith {
		bad := func(format string, args ...any) {
			errs = append(errs, fmt.Errorf("peers: config: federatesWith[%d] (%s): %s", i, e.TrustDomain, fmt.Sprintf(format, args...)))
		}
		td, err := spiffeid.TrustDomainFromString(e.TrustDomain)
		if err != nil {
			bad("trustDomain: %v", err)
			continue
		}
		if td == own {
			bad("is this CA's own trust domain: a peer's bundle never signs for it")
			continue
		}
		if seen[td] {
			bad("listed twice")
			continue
		}
		seen[td] = true
		p := Peer{TrustDomain: td, URL: e.BundleEndpointURL, Profile: Profile(e.BundleEndpointProfile.Type)}
		if u, err := url.Parse(e.BundleEndpointURL); err != nil || u.Scheme != "https" || u.Host == "" {
			bad("bundleEndpointURL %q: want an https:// URL", e.BundleEndpointURL)
		}
		switch p.Profile {
		case HTTPSWeb:
			if e.BundleEndpointProfile.EndpointSPIFFEID != "" {
				bad("endpointSPIFFEID is for https_spiffe")
			}
			if e.RootsFile != "" {
				pem, err := os.ReadFile(e.RootsFile)
				if err != nil {
					bad("rootsFile: %v", err)
					break
				}
				p.WebRoots = x509.NewCertPool()
				if !p.WebRoots.AppendCertsFromPEM(pem) {
					bad("rootsFile %s: no PEM certificate", e.RootsFile)
				}
			}
		case HTTPSSPIFFE:
			id, err := spiffeid.FromString(e.BundleEndpointProfile.EndpointSPIFFEID)
			if err != nil {
				bad("endpointSPIFFEID: %v", err)
				break
			}
			p.EndpointID = id
			if strings.TrimSpace(e.TrustDomainBundle) == "" {
				// The endpoint's SVID is of id's trust domain: without a
				// bundle of it there is nothing to verify the first fetch by.
				bad("https_spiffe needs trustDomainBundle, the endpoint's trust domain's bundle to start from")
				break
			}
			if id.TrustDomain() != td {
				// SPIRE allows an endpoint of another trust domain (whose
				// bundle is then known otherwise); not supported here.
				bad("endpointSPIFFEID %s is not in %s", id, td)
				break
			}
			if p.Bootstrap, err = spiffebundle.Parse(td, []byte(e.TrustDomainBundle)); err != nil {
				bad("trustDomainBundle: %v", err)
			} else if len(p.Bootstrap.X509Authorities()) == 0 {
				bad("trustDomainBundle holds no X.509 authority")
			}
		default:
			bad("bundleEndpointProfile.type %q: want https_web or https_spiffe", e.BundleEndpointProfile.Type)
		}
		peers = append(peers, p)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return peers, nil
}
