package keys

import (
	"sync/atomic"
	"time"

	"github.com/meshid/meshid/ca"
)

// Source holds the current issuer. Swapping it never disturbs a request in
// flight: each request keeps the issuer it read.
type Source struct {
	cur     atomic.Pointer[ca.Issuer]
	stage   atomic.Pointer[Stage]
	renewAt atomic.Pointer[time.Time]
}

// Issuer returns the current issuer, or nil before the first Set.
func (s *Source) Issuer() *ca.Issuer { return s.cur.Load() }

// Set makes is the current issuer.
func (s *Source) Set(is *ca.Issuer) { s.cur.Store(is) }

// Use makes is, made from m, the current issuer, and records m's root
// rotation stage.
func (s *Source) Use(m *Material, is *ca.Issuer) {
	stage := m.RotationStage()
	s.stage.Store(&stage)
	at := renewAt(m)
	s.renewAt.Store(&at)
	s.cur.Store(is)
}

// RenewAt is when the CA last given to Use is due for a new intermediate;
// zero before, and for a CA meshid does not renew (a plug-in CA).
func (s *Source) RenewAt() time.Time {
	if p := s.renewAt.Load(); p != nil {
		return *p
	}
	return time.Time{}
}

// Stage is the root rotation stage of the CA last given to Use; StageNone
// before, and for a CA only ever Set (a plug-in CA).
func (s *Source) Stage() Stage {
	if p := s.stage.Load(); p != nil {
		return *p
	}
	return StageNone
}
