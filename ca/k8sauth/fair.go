package k8sauth

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"
)

// Fair lets at most Concurrency checks by Auth run at once and hands free
// slots to the peers waiting for one in turn (see [WithPeer]): a peer that
// sends many tokens waits behind its own, not in front of everyone else's.
// A peer may have at most PerPeer checks waiting (0: no bound); more are
// refused at once as unavailable. A request that goes away leaves the
// queue, so no slot is spent on a check no one waits for.
//
// Concurrency rather than a rate bounds the reviews: the API server's
// Priority and Fairness queues them when it is busy, and fewer go out per
// second as each takes longer.
type Fair struct {
	Auth        Authenticator
	Concurrency int // 0: no bound, Fair only passes checks through
	PerPeer     int
	Metrics     *Metrics

	mu       sync.Mutex
	inFlight int
	queued   int
	queues   map[string][]*waiter
	ring     []string // peers with a check waiting, served in this order
	next     int      // index in ring of the peer served next
}

type waiter struct {
	ready   chan struct{}
	peer    string
	granted bool
}

var errPeerQueueFull = errors.New("too many token checks waiting for this peer")

// Authenticate waits for a slot, then checks token with Auth.
func (f *Fair) Authenticate(ctx context.Context, token string) (Caller, error) {
	if f.Concurrency <= 0 {
		return f.Auth.Authenticate(ctx, token)
	}
	start := time.Now()
	if err := f.acquire(ctx); err != nil {
		return Caller{}, err
	}
	f.Metrics.waited(time.Since(start))
	defer f.release()
	return f.Auth.Authenticate(ctx, token)
}

func (f *Fair) acquire(ctx context.Context) error {
	peer := peerFrom(ctx)
	f.mu.Lock()
	if f.inFlight < f.Concurrency && f.queued == 0 {
		f.inFlight++
		f.reportLocked()
		f.mu.Unlock()
		return nil
	}
	if f.queues == nil {
		f.queues = make(map[string][]*waiter)
	}
	q := f.queues[peer]
	if f.PerPeer > 0 && len(q) >= f.PerPeer {
		f.mu.Unlock()
		return unavailable(errPeerQueueFull)
	}
	w := &waiter{ready: make(chan struct{}), peer: peer}
	if len(q) == 0 {
		f.ring = append(f.ring, peer)
	}
	f.queues[peer] = append(q, w)
	f.queued++
	f.reportLocked()
	f.mu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
		f.mu.Lock()
		granted := w.granted
		if !granted {
			f.removeLocked(w)
			f.reportLocked()
		}
		f.mu.Unlock()
		if granted {
			f.release() // handed a slot just as the request left: pass it on
		}
		return unavailable(ctx.Err())
	}
}

// release hands the slot to the next peer's oldest waiter, or frees it.
func (f *Fair) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.ring) == 0 {
		f.inFlight--
		f.reportLocked()
		return
	}
	if f.next >= len(f.ring) {
		f.next = 0
	}
	peer := f.ring[f.next]
	q := f.queues[peer]
	w := q[0]
	q[0] = nil
	if len(q) == 1 {
		delete(f.queues, peer)
		f.ring = slices.Delete(f.ring, f.next, f.next+1)
	} else {
		f.queues[peer] = q[1:]
		f.next++
	}
	f.queued--
	w.granted = true
	close(w.ready)
	f.reportLocked()
}

func (f *Fair) removeLocked(w *waiter) {
	q := f.queues[w.peer]
	i := slices.Index(q, w)
	if i < 0 {
		return
	}
	f.queued--
	if len(q) > 1 {
		f.queues[w.peer] = slices.Delete(q, i, i+1)
		return
	}
	delete(f.queues, w.peer)
	if r := slices.Index(f.ring, w.peer); r >= 0 {
		f.ring = slices.Delete(f.ring, r, r+1)
		if r < f.next {
			f.next--
		}
	}
}

// Queued is the number of checks waiting for a slot.
func (f *Fair) Queued() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queued
}

func (f *Fair) reportLocked() { f.Metrics.setQueue(f.inFlight, f.queued) }

type peerKey struct{}

// WithPeer records who presented the tokens checked under ctx: a client's
// address, a local process. [Fair] shares review slots between peers.
func WithPeer(ctx context.Context, peer string) context.Context {
	return context.WithValue(ctx, peerKey{}, peer)
}

type clusterKey struct{}

// WithCluster records in ctx the cluster a caller says its token is from
// (Istio's clusterid header), for an authenticator that knows several.
func WithCluster(ctx context.Context, clusterID string) context.Context {
	return context.WithValue(ctx, clusterKey{}, clusterID)
}

// ClusterFrom is what WithCluster recorded, "" if nothing.
func ClusterFrom(ctx context.Context) string {
	c, _ := ctx.Value(clusterKey{}).(string)
	return c
}

func peerFrom(ctx context.Context) string {
	p, _ := ctx.Value(peerKey{}).(string)
	return p
}
