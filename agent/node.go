package agent

import (
	"context"
	"errors"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/k8sauth"
)

// Node resolves each caller to the identity its own token proves, as one
// agent serving every proxy on a node does (node mode). The token comes in
// the stream's metadata as "authorization: Bearer <token>", which is what
// Envoy's file-based call credentials send from the pod's projected token.
// A stream never gets an identity its token does not prove; it is closed
// when its token expires.
type Node struct {
	Manager     *Manager
	Auth        k8sauth.Authenticator
	TrustDomain spiffeid.TrustDomain
}

// Resolve authenticates the caller's token and holds its identity.
func (n Node) Resolve(ctx context.Context) (*Handle, error) {
	token := bearer(ctx)
	if token == "" {
		return nil, status.Error(codes.Unauthenticated, "no token: send the pod's projected service-account token as authorization: Bearer <token>")
	}
	caller, err := n.Auth.Authenticate(k8sauth.WithPeer(ctx, peerOf(ctx)), token)
	switch {
	case errors.Is(err, k8sauth.ErrUnavailable):
		return nil, status.Error(codes.Unavailable, "cannot check the token now")
	case err != nil:
		return nil, status.Error(codes.Unauthenticated, "token refused")
	}
	id, err := spiffeid.FromSegments(n.TrustDomain, "ns", caller.Namespace, "sa", caller.ServiceAccount)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, "token names no valid identity")
	}
	return n.Manager.AcquireUntil(id, StaticToken(token), caller.Expiry), nil
}

// peerOf names the process at the other end of the stream (sds.Listen
// makes it "pid:N"), for fair shares of token reviews.
func peerOf(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

func bearer(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		if tok, ok := strings.CutPrefix(v, "Bearer "); ok && tok != "" {
			return tok
		}
	}
	return ""
}
