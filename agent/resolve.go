package agent

import (
	"context"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Pod resolves every caller to one identity, as an agent beside a single
// workload does (pod mode): the pod's own service account, proven with its
// projected token. The SDS and Workload API servers use it.
type Pod struct {
	Manager *Manager
	ID      spiffeid.ID
	Tokens  TokenSource
}

// Resolve holds the pod's identity for the caller; release it when done.
func (p Pod) Resolve(context.Context) (*Handle, error) {
	return p.Manager.Acquire(p.ID, p.Tokens), nil
}
