package agent

import (
	"errors"
	"fmt"
	"time"
)

// Rotation decides when a certificate is renewed: at Fraction of its
// lifetime, moved by up to ±Jitter of the lifetime so that agents started
// together do not renew together. Its methods are pure functions of their
// inputs; randomness comes in as a number in [0, 1).
type Rotation struct {
	Fraction float64 // 0.5: renew at half life
	Jitter   float64 // 0.1: ±10% of the lifetime
}

// DefaultRotation renews at 50% of the lifetime ± 10%.
var DefaultRotation = Rotation{Fraction: 0.5, Jitter: 0.1}

// Validate checks that renewal always falls inside the lifetime.
func (r Rotation) Validate() error {
	if r.Fraction <= 0 || r.Fraction >= 1 {
		return fmt.Errorf("agent: rotation fraction %v must be between 0 and 1", r.Fraction)
	}
	if r.Jitter < 0 || r.Fraction-r.Jitter <= 0 || r.Fraction+r.Jitter >= 1 {
		return errors.New("agent: rotation jitter must be non-negative and keep renewal strictly inside the lifetime")
	}
	return nil
}

// RenewAt is when a certificate valid from notBefore to notAfter is renewed,
// for u in [0, 1).
func (r Rotation) RenewAt(notBefore, notAfter time.Time, u float64) time.Time {
	life := notAfter.Sub(notBefore)
	if life <= 0 {
		return notBefore
	}
	f := r.Fraction + r.Jitter*(2*u-1)
	return notBefore.Add(time.Duration(f * float64(life)))
}

// Backoff spaces retries after failures: exponential from Initial up to Max,
// each delay drawn in [d/2, d] ("equal jitter") so retries of many agents
// spread out but none retries at once.
type Backoff struct {
	Initial time.Duration
	Max     time.Duration
}

// DefaultBackoff retries after 1s, 2s, 4s, … up to 2 minutes, jittered.
var DefaultBackoff = Backoff{Initial: time.Second, Max: 2 * time.Minute}

// Delay is the wait before retry number attempt (0 for the first retry), for
// u in [0, 1).
func (b Backoff) Delay(attempt int, u float64) time.Duration {
	d := b.Initial
	for i := 0; i < attempt && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	return d/2 + time.Duration(u*float64(d/2))
}
