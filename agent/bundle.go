package agent

import (
	"crypto/x509"
	"slices"
	"sync"
)

// Bundle is the set of trusted roots served to workloads. During a root
// rotation it holds the old and the new root; every change is announced so
// that open streams get it at once.
type Bundle struct {
	mu    sync.Mutex
	roots []*x509.Certificate
	watch watchers
}

// NewBundle starts with roots.
func NewBundle(roots []*x509.Certificate) *Bundle {
	return &Bundle{roots: slices.Clone(roots), watch: newWatchers()}
}

// Roots returns the current roots; callers must not modify the slice.
func (b *Bundle) Roots() []*x509.Certificate {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.roots
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
