package admin

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/ledger"
)

// Admins says who may use the admin API.
type Admins struct {
	// IDs are SPIFFE IDs whose client certificates are admitted. The TLS
	// handshake has already verified the certificate against the CA's
	// roots; but roots are shared (one plug-in root for several clusters,
	// as Istio's multicluster meshes have it), so the certificate must
	// also be one this CA issued: recorded in its ledger with the same
	// identity, key and issuer (Issued: the ledger).
	IDs    []spiffeid.ID
	Issued Issued
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
	msgNotOurs       = "admin API: client certificate was not issued by this CA"
)

// Issued finds a certificate this CA issued; *ledger.Ledger is one.
type Issued interface {
	Certificate(ctx context.Context, serial string) (ledger.Record, error)
}

// authorize returns who the caller is if they are an admin. A client
// certificate, when given, decides alone: a valid certificate of a
// non-admin is refused even with an admin token beside it.
func (a *Admins) authorize(ctx context.Context) (actor string, err error) {
	if id, chain, ok := peerID(ctx); ok {
		if !slices.Contains(a.IDs, id) {
			return "", status.Error(codes.PermissionDenied, msgNotAdmin)
		}
		if err := issuedHere(ctx, a.Issued, id, chain); err != nil {
			return "", err
		}
		return id.String(), nil
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

// issuedHere checks that the leaf of chain is a certificate this CA issued
// to id: its serial recorded with that identity, that key, and the issuer
// the chain was verified through. Another CA under the same root cannot
// make one: it would need the admin's private key for the recorded key.
func issuedHere(ctx context.Context, issued Issued, id spiffeid.ID, chain []*x509.Certificate) error {
	if issued == nil || len(chain) < 2 {
		return status.Error(codes.PermissionDenied, msgNotOurs)
	}
	leaf := chain[0]
	rec, err := issued.Certificate(ctx, fmt.Sprintf("%x", leaf.SerialNumber))
	switch {
	case errors.Is(err, ledger.ErrNotFound):
		return status.Error(codes.PermissionDenied, msgNotOurs)
	case err != nil:
		return status.Error(codes.Unavailable, msgAuthDown)
	}
	spki := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	if rec.SPIFFEID != id.String() || rec.PublicKeySHA256 != hex.EncodeToString(spki[:]) || rec.IssuerFingerprint != ca.Fingerprint(chain[1]) {
		return status.Error(codes.PermissionDenied, msgNotOurs)
	}
	return nil
}

// peerID is the SPIFFE ID of a client certificate the handshake verified,
// with the chain it was verified through.
func peerID(ctx context.Context) (spiffeid.ID, []*x509.Certificate, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return spiffeid.ID{}, nil, false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 {
		return spiffeid.ID{}, nil, false
	}
	chain := info.State.VerifiedChains[0]
	leaf := chain[0]
	if len(leaf.URIs) != 1 {
		return spiffeid.ID{}, nil, false
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return spiffeid.ID{}, nil, false
	}
	return id, chain, true
}
