package admin

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/k8sauth"
)

// Admins says who may use the admin API.
type Admins struct {
	// IDs are SPIFFE IDs whose client certificates are admitted. The TLS
	// handshake has already verified the certificate against the CA's
	// roots; only its one URI SAN is compared here.
	IDs []spiffeid.ID
	// ServiceAccounts ("namespace/name") whose bearer tokens are admitted,
	// checked by Auth.
	ServiceAccounts []string
	Auth            k8sauth.Authenticator
}

// Messages returned to callers; short and stable.
const (
	msgNoCredentials = "admin API: present an admin client certificate or an admin service account's bearer token"
	msgNotAdmin      = "admin API: caller is not an administrator"
	msgAuthFailed    = "admin API: authentication failed"
	msgAuthDown      = "admin API: authentication unavailable"
)

// authorize returns who the caller is if they are an admin. A client
// certificate, when given, decides alone: a valid certificate of a
// non-admin is refused even with an admin token beside it.
func (a *Admins) authorize(ctx context.Context) (actor string, err error) {
	if id, ok := peerID(ctx); ok {
		if slices.Contains(a.IDs, id) {
			return id.String(), nil
		}
		return "", status.Error(codes.PermissionDenied, msgNotAdmin)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	token, err := k8sauth.BearerToken(md)
	if err != nil {
		return "", status.Error(codes.Unauthenticated, msgNoCredentials)
	}
	if a.Auth == nil {
		return "", status.Error(codes.Unauthenticated, msgAuthFailed)
	}
	caller, err := a.Auth.Authenticate(ctx, token)
	switch {
	case errors.Is(err, k8sauth.ErrUnavailable):
		return "", status.Error(codes.Unavailable, msgAuthDown)
	case err != nil:
		return "", status.Error(codes.Unauthenticated, msgAuthFailed)
	}
	if !slices.Contains(a.ServiceAccounts, caller.Namespace+"/"+caller.ServiceAccount) {
		return "", status.Error(codes.PermissionDenied, msgNotAdmin)
	}
	return fmt.Sprintf("system:serviceaccount:%s:%s", caller.Namespace, caller.ServiceAccount), nil
}

// peerID is the SPIFFE ID of a client certificate the handshake verified.
func peerID(ctx context.Context) (spiffeid.ID, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 {
		return spiffeid.ID{}, false
	}
	leaf := info.State.VerifiedChains[0][0]
	if len(leaf.URIs) != 1 {
		return spiffeid.ID{}, false
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return spiffeid.ID{}, false
	}
	return id, true
}
