package distribute

import (
	"errors"
	"fmt"
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
	RefreshHint time.Duration // default DefaultRefreshHint
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
	hint := b.RefreshHint
	if hint <= 0 {
		hint = DefaultRefreshHint
	}
	bundle.SetRefreshHint(hint)
	return bundle, nil
}
