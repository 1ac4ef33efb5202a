package sds

import (
	"context"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/agent"
)

// Pod serves one identity to every stream, as an agent beside a single
// workload does (pod mode): the pod's own service account, proven with its
// projected token.
type Pod struct {
	Manager *agent.Manager
	ID      spiffeid.ID
	Tokens  agent.TokenSource
}

// Resolve holds the pod's identity for the stream.
func (p Pod) Resolve(context.Context) (Workload, error) {
	return p.Manager.Acquire(p.ID, p.Tokens), nil
}
