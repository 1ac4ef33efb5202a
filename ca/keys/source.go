package keys

import (
	"sync/atomic"

	"github.com/meshid/meshid/ca"
)

// Source holds the current issuer. Swapping it never disturbs a request in
// flight: each request keeps the issuer it read.
type Source struct {
	cur atomic.Pointer[ca.Issuer]
}

// Issuer returns the current issuer, or nil before the first Set.
func (s *Source) Issuer() *ca.Issuer { return s.cur.Load() }

// Set makes is the current issuer.
func (s *Source) Set(is *ca.Issuer) { s.cur.Store(is) }
