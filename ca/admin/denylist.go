package admin

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/meshid/meshid/ca/ledger"
)

// DenyList is the set of denied identities the issuance path checks on
// every request. It lives in memory, so the check costs a map lookup; the
// ledger is the truth, read again every few seconds (Keep) so that a deny
// made through another replica is enforced here too.
//
// A deny made here holds at once: Deny returns only once every issuance
// that had passed the check before it has finished (each checks again
// before it returns a certificate, see Guard), so none leaves afterwards;
// and a refresh that read the ledger before the deny committed does not
// put the old set back.
type DenyList struct {
	mu     sync.RWMutex
	denied map[string]ledger.Denial
	gen    uint64 // bumped by every change made here, not by refreshes

	gate sync.RWMutex // held shared by issuances, alone by Deny's barrier
}

// Denied says whether spiffeID is cut off.
func (d *DenyList) Denied(spiffeID string) bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	_, ok := d.denied[spiffeID]
	return ok
}

// Guard is held by an issuance from its deny check until its certificate
// is returned or refused; call the function it returns then. The issuance
// checks Denied again just before it returns a certificate.
func (d *DenyList) Guard() (release func()) {
	d.gate.RLock()
	return d.gate.RUnlock
}

// Replace makes ds the whole set.
func (d *DenyList) Replace(ds []ledger.Denial) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.replaceLocked(ds)
}

func (d *DenyList) replaceLocked(ds []ledger.Denial) {
	m := make(map[string]ledger.Denial, len(ds))
	for _, x := range ds {
		m[x.SPIFFEID] = x
	}
	d.denied = m
}

// Deny cuts x's identity off here, and returns once no issuance that passed
// the check before it can still return a certificate.
func (d *DenyList) Deny(x ledger.Denial) {
	d.mu.Lock()
	if d.denied == nil {
		d.denied = map[string]ledger.Denial{}
	}
	d.denied[x.SPIFFEID] = x
	d.gen++
	d.mu.Unlock()
	d.barrier()
}

// barrier waits out the issuances in flight: each checks again before it
// returns, and sees the change.
func (d *DenyList) barrier() {
	d.gate.Lock()
	defer d.gate.Unlock()
}

// Allow lets spiffeID back in here.
func (d *DenyList) Allow(spiffeID string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.denied, spiffeID)
	d.gen++
}

// DenialReader reads the denied identities; *ledger.Ledger is one.
type DenialReader interface {
	Denials(ctx context.Context) ([]ledger.Denial, error)
}

// Load reads the set from l once. If a deny or allow was made here while
// it read, the set it read may predate it: it is dropped, and the next
// Load brings the ledger's set, which has it.
func (d *DenyList) Load(ctx context.Context, l DenialReader) error {
	d.mu.RLock()
	gen := d.gen
	d.mu.RUnlock()
	ds, err := l.Denials(ctx)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gen == gen {
		d.replaceLocked(ds)
	}
	return nil
}

// Keep reads the set from l every interval until ctx ends. A failed read
// keeps the set it had: the ledger being down stops issuance anyway.
func (d *DenyList) Keep(ctx context.Context, l DenialReader, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := d.Load(ctx, l); err != nil && ctx.Err() == nil {
			log.Warn("admin: reading denied identities failed; keeping the last set", "error", err)
		}
	}
}
