package keys

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/meshid/meshid/ca"
)

// Store keeps a CA that meshid owns (it holds the root key); *StateDir and
// *Secret are ones.
type Store interface {
	Load(ctx context.Context) (*Material, error)
	// Save replaces prev, as read from the store, with m; ErrStale if the
	// store no longer holds prev.
	Save(ctx context.Context, prev, m *Material) error
}

// RenewAt is when m's intermediate is replaced: once only a third of its
// lifetime is left (four months before a one-year intermediate lapses), so
// a failing renewal has months of retries and alarms before it matters; or
// a third before a CA above it short of the root lapses, if sooner.
func (m *Material) RenewAt() time.Time { return renewAt(m) }

// Renewer replaces the signing intermediate of a CA meshid owns before it
// lapses, under the same root: workloads trust the root, so nothing changes
// for them. Replicas sharing a Secret may both try; the store lets one win
// and the others adopt its CA (Follow also picks it up between renewals).
type Renewer struct {
	Store  Store
	Source *Source
	// Upstream, for a CA whose root is someone else's (step-ca), is asked
	// for each new intermediate; otherwise meshid's root key signs it.
	Upstream  *UpstreamCA
	Algorithm Algorithm
	TTL       time.Duration // of a new intermediate
	// Follow is how often the store is read for a CA changed elsewhere (an
	// intermediate another replica renewed, a root rotation's step); 0 never.
	Follow time.Duration
	Now    func() time.Time // nil: time.Now
	Log    *slog.Logger
	// Renewed, if set, hears of each renewal attempt (for metrics).
	Renewed func(err error)

	last time.Time // of the last renewal; Check and Run are called in turn, never at once

	rebundleOnce sync.Once
	rebundle     chan struct{}
}

// Rebundle makes Run serve its CA again with the upstream's roots as they
// are now (SetRoots after --step-root-file changed). It never blocks.
func (r *Renewer) Rebundle() {
	select {
	case r.rebundles() <- struct{}{}:
	default: // one is pending already
	}
}

func (r *Renewer) rebundles() chan struct{} {
	r.rebundleOnce.Do(func() { r.rebundle = make(chan struct{}, 1) })
	return r.rebundle
}

func (r *Renewer) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func (r *Renewer) log() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.New(slog.DiscardHandler)
}

// use makes m the CA that signs.
func (r *Renewer) use(m *Material) error {
	if r.Upstream != nil {
		// The bundle is the upstream's roots as configured here.
		withBundle := *m
		withBundle.Roots = r.Upstream.Bundle(m)
		m = &withBundle
	}
	is, err := m.Issuer(r.now())
	if err != nil {
		return err
	}
	r.Source.Use(m, is)
	return nil
}

// Check renews m's intermediate if it is due and returns the CA in effect
// afterwards: m, a renewed one, or the one another replica stored.
func (r *Renewer) Check(ctx context.Context, m *Material) (*Material, error) {
	now := r.now()
	if m.RootKey == nil && r.Upstream == nil {
		return m, errors.New("keys: cannot renew the intermediate of a CA whose root key meshid does not hold")
	}
	if now.Before(renewAt(m)) {
		return m, nil
	}
	next := *m
	var err error
	if r.Upstream != nil {
		var got *Material
		if got, err = r.Upstream.Intermediate(ctx, now, m); err == nil {
			next = *got
		}
	} else {
		err = next.RenewIntermediate(r.Algorithm, r.TTL, now)
	}
	if err == nil {
		err = r.Store.Save(ctx, m, &next)
	}
	if errors.Is(err, ErrStale) {
		stored, err := r.Store.Load(ctx)
		if err != nil {
			return m, err
		}
		if err := r.use(stored); err != nil {
			return m, err
		}
		r.last = time.Now() // a renewal all the same: the gap counts from it
		r.log().Info("intermediate renewed by another replica; using it", "ca_fingerprint", ca.Fingerprint(stored.CACert), "ca_not_after", stored.CACert.NotAfter.UTC())
		return stored, nil
	}
	if err == nil {
		err = r.use(&next)
	}
	if r.Renewed != nil {
		r.Renewed(err)
	}
	if err != nil {
		return m, fmt.Errorf("keys: renewing the intermediate: %w", err)
	}
	r.last = time.Now()
	r.log().Info("intermediate renewed", "ca_fingerprint", ca.Fingerprint(next.CACert), "ca_not_after", next.CACert.NotAfter.UTC(),
		"previous_not_after", m.CACert.NotAfter.UTC())
	return &next, nil
}

// minRenewGap keeps Run from renewing again at once when a new
// intermediate is itself due (a lifetime shorter than its backdating, as
// tests use): one renewal a minute at most, by any replica.
const minRenewGap = time.Minute

// maxRenewRetry bounds the backoff between failed renewals: an upstream
// that is down is asked again at least this often.
const maxRenewRetry = 10 * time.Minute

// Run checks at each renewal time (and every Follow) until ctx ends,
// retrying a failed renewal after a minute, then backing off to
// maxRenewRetry.
func (r *Renewer) Run(ctx context.Context, m *Material) {
	retry := time.Minute
	for {
		wait := max(time.Until(renewAt(m)), time.Until(r.last.Add(minRenewGap)), 0)
		if r.Follow > 0 {
			wait = min(wait, r.Follow)
		}
		select {
		case <-ctx.Done():
			return
		case <-r.rebundles():
			if err := r.use(m); err != nil {
				r.log().Error("serving the new trust bundle failed", "error", err)
			} else {
				r.log().Info("trust bundle changed", "roots", len(r.Source.Issuer().Roots()))
			}
			continue
		case <-time.After(wait):
		}
		if r.Follow > 0 {
			if stored, err := r.Store.Load(ctx); err == nil && !stored.Equal(m) {
				if err := r.use(stored); err == nil {
					// Another replica's renewal counts towards the gap
					// too: else replicas whose new intermediate is due at
					// once would take turns renewing it, each as soon as
					// it sees the other's.
					r.last = time.Now()
					r.log().Info("CA changed in the store (renewed or rotated elsewhere); using it", "ca_fingerprint", ca.Fingerprint(stored.CACert),
						"root_rotation", stored.RotationStage())
					m = stored
					continue
				}
			}
		}
		if time.Now().Before(r.last.Add(minRenewGap)) {
			continue // woken to follow the store, not to renew
		}
		next, err := r.Check(ctx, m)
		if err != nil {
			r.log().Error("renewing the intermediate failed; retrying", "error", err, "retry_in", retry, "ca_not_after", m.CACert.NotAfter.UTC())
			select {
			case <-ctx.Done():
				return
			case <-time.After(retry):
			}
			retry = min(2*retry, maxRenewRetry)
			continue
		}
		retry = time.Minute
		m = next
	}
}
