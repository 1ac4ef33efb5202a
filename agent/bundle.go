package agent

import (
	"crypto"
	"crypto/x509"
	"maps"
	"slices"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bundle is what workloads are told to trust: their own trust domain's
// roots (during a root rotation, the old and the new one) and the bundles
// of the trust domains meshid federates with. Every change is announced so
// that open streams get it at once.
type Bundle struct {
	mu        sync.Mutex
	td        spiffeid.TrustDomain
	roots     []*x509.Certificate
	federated map[spiffeid.TrustDomain]*spiffebundle.Bundle
	jwt       map[string]crypto.PublicKey // own JWT-SVID keys, by kid
	watch     watchers
}

// NewBundle starts with roots as trust domain td's, and no federation.
func NewBundle(td spiffeid.TrustDomain, roots []*x509.Certificate) *Bundle {
	return &Bundle{td: td, roots: slices.Clone(roots), watch: newWatchers()}
}

// TrustDomain is the workloads' own trust domain.
func (b *Bundle) TrustDomain() spiffeid.TrustDomain { return b.td }

// Roots returns the current roots; callers must not modify the slice.
func (b *Bundle) Roots() []*x509.Certificate {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.roots
}

// Federated returns the federated trust domains' bundles held now (never
// the own trust domain's); callers must not modify the map.
func (b *Bundle) Federated() map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.federated
}

// JWTAuthorities returns the own trust domain's JWT-SVID keys by kid;
// callers must not modify the map.
func (b *Bundle) JWTAuthorities() map[string]crypto.PublicKey {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.jwt
}

// SetJWTAuthorities replaces the own trust domain's JWT-SVID keys,
// announcing it only if they differ.
func (b *Bundle) SetJWTAuthorities(keys map[string]crypto.PublicKey) {
	next := maps.Clone(keys)
	if len(next) == 0 {
		next = nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if maps.EqualFunc(b.jwt, next, publicKeyEqual) {
		return
	}
	b.jwt = next
	b.watch.fire()
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// Changed is closed at the next change; then call it again.
func (b *Bundle) Changed() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.watch.changed
}

// OnChange calls f at every change until stop is called. f runs with the
// bundle locked: it must return at once and not call the bundle.
func (b *Bundle) OnChange(f func()) (stop func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	id := b.watch.add(f)
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.watch.remove(id)
	}
}

// Set replaces the roots, announcing it only if they differ.
func (b *Bundle) Set(roots []*x509.Certificate) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if slices.EqualFunc(b.roots, roots, (*x509.Certificate).Equal) {
		return
	}
	b.roots = slices.Clone(roots)
	b.watch.fire()
}

// SetFederated replaces the federated bundles, announcing it only if they
// differ. An entry for the own trust domain is dropped: a peer never signs
// for it.
func (b *Bundle) SetFederated(bundles map[spiffeid.TrustDomain]*spiffebundle.Bundle) {
	next := maps.Clone(bundles)
	delete(next, b.td)
	if len(next) == 0 {
		next = nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if maps.EqualFunc(b.federated, next, (*spiffebundle.Bundle).Equal) {
		return
	}
	b.federated = next
	b.watch.fire()
}
