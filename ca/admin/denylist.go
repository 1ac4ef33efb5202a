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
type DenyList struct {
	mu     sync.RWMutex
	denied map[string]ledger.Denial
}

// Denied says whether spiffeID is cut off.
func (d *DenyList) Denied(spiffeID string) bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	_, ok := d.denied[spiffeID]
	return ok
}

// Replace makes ds the whole set.
func (d *DenyList) Replace(ds []ledger.Denial) {
	m := make(map[string]ledger.Denial, len(ds))
	for _, x := range ds {
		m[x.SPIFFEID] = x
	}
	d.mu.Lock()
	d.denied = m
	d.mu.Unlock()
}

func (d *DenyList) add(x ledger.Denial) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.denied == nil {
		d.denied = map[string]ledger.Denial{}
	}
	d.denied[x.SPIFFEID] = x
}

func (d *DenyList) remove(spiffeID string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.denied, spiffeID)
}

// Load reads the set from l once.
func (d *DenyList) Load(ctx context.Context, l *ledger.Ledger) error {
	ds, err := l.Denials(ctx)
	if err != nil {
		return err
	}
	d.Replace(ds)
	return nil
}

// Keep reads the set from l every interval until ctx ends. A failed read
// keeps the set it had: the ledger being down stops issuance anyway.
func (d *DenyList) Keep(ctx context.Context, l *ledger.Ledger, interval time.Duration, log *slog.Logger) {
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
