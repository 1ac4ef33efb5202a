package multicluster

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/meshid/meshid/ca/k8sauth"
)

// Authenticators finds the authenticator of a remote cluster; *Remotes is
// one.
type Authenticators interface {
	Authenticator(clusterID string) (k8sauth.Authenticator, bool)
	// Synced says whether the clusters are known yet: until then a
	// cluster not found may be one not read yet.
	Synced() bool
}

// Router authenticates a token against the cluster the caller names
// ([k8sauth.ClusterFrom]): this cluster when it names none or LocalID, a
// remote one otherwise, and refuses a cluster it does not know.
//
// Without Remotes (one cluster) every token is this cluster's, whatever
// cluster its caller names, as before multicluster support: a mesh whose
// Istio calls its only cluster something other than LocalID keeps working,
// and Log hears of it once per name.
type Router struct {
	LocalID string
	Local   k8sauth.Authenticator
	Remotes Authenticators // nil: this cluster only
	Log     *slog.Logger

	mu     sync.Mutex
	warned map[string]bool
}

// Authenticate implements [k8sauth.Authenticator].
func (r *Router) Authenticate(ctx context.Context, token string) (k8sauth.Caller, error) {
	cluster := k8sauth.ClusterFrom(ctx)
	auth := r.Local
	switch {
	case cluster == "" || cluster == r.LocalID:
		cluster = r.LocalID
	case r.Remotes == nil:
		r.warnOnce(cluster)
		cluster = r.LocalID
	default:
		var ok bool
		if auth, ok = r.Remotes.Authenticator(cluster); !ok && !r.Remotes.Synced() {
			return k8sauth.Caller{}, k8sauth.Unavailable(fmt.Errorf("multicluster: remote cluster Secrets not listed yet"))
		}
		if !ok {
			return k8sauth.Caller{}, &k8sauth.Error{Reason: "unknown_cluster",
				Detail: fmt.Sprintf("the caller names cluster %.64q; this CA is cluster %q and knows no remote cluster of that name", cluster, r.LocalID)}
		}
	}
	c, err := auth.Authenticate(ctx, token)
	if err != nil {
		return k8sauth.Caller{}, err
	}
	c.Cluster = cluster
	return c, nil
}

// warnOnce tells the log, once per name (for the first 16), that callers
// name a cluster other than this one's.
func (r *Router) warnOnce(cluster string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.warned == nil {
		r.warned = map[string]bool{}
	}
	if r.Log == nil || r.warned[cluster] || len(r.warned) >= 16 {
		return
	}
	r.warned[cluster] = true
	r.Log.Warn("callers name a cluster other than this CA's --cluster-id; their tokens are checked against this cluster, as no remote clusters are configured. Set --cluster-id to the name Istio gives this cluster (global.multiCluster.clusterName) before adding remote clusters",
		"claimed_cluster", fmt.Sprintf("%.64q", cluster), "cluster_id", r.LocalID)
}
