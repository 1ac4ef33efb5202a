package server

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/ca/jwtsvid/jwtsvidpb"
)

const (
	msgNoJWTKey   = "JWT-SVID signing key not loaded yet"
	msgJWTSignErr = "JWT-SVID signing failed"
)

// JWTSigner signs JWT-SVIDs; *jwtsvid.Keys is one.
type JWTSigner interface {
	Sign(id spiffeid.ID, audience []string, ttl time.Duration) (*jwtsvid.SVID, error)
}

// JWTService implements MintJWTSVID: the caller is authenticated and
// authorized exactly as for CreateCertificate (token, node proxies, deny
// list, rate limits, which both share), and gets a JWT-SVID for its
// identity.
type JWTService struct {
	jwtsvidpb.UnimplementedJWTSVIDServiceServer
	certs  *CertificateService
	signer JWTSigner
}

// JWT returns the JWT-SVID service signing with signer, authorizing as s.
func (s *CertificateService) JWT(signer JWTSigner) *JWTService {
	return &JWTService{certs: s, signer: signer}
}

// Register adds the service to g.
func (j *JWTService) Register(g *grpc.Server) { jwtsvidpb.RegisterJWTSVIDServiceServer(g, j) }

// MintJWTSVID signs a JWT-SVID for the caller.
func (j *JWTService) MintJWTSVID(ctx context.Context, req *jwtsvidpb.MintJWTSVIDRequest) (*jwtsvidpb.MintJWTSVIDResponse, error) {
	resp, err := j.mint(ctx, req)
	j.certs.metrics.jwtRequests.WithLabelValues(status.Code(err).String()).Inc()
	return resp, err
}

func (j *JWTService) mint(ctx context.Context, req *jwtsvidpb.MintJWTSVIDRequest) (*jwtsvidpb.MintJWTSVIDResponse, error) {
	s := j.certs
	var impersonated *string
	if req.GetImpersonatedIdentity() != "" {
		impersonated = ptr(req.GetImpersonatedIdentity())
	}
	a, release, err := s.authorize(ctx, impersonated)
	if err != nil {
		return nil, err
	}
	defer release()
	log := a.log
	if err := jwtsvid.CheckAudience(req.GetAudience()); err != nil {
		s.refusals.refuse(log, slog.LevelWarn, "audience", "request refused", "error", err)
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	ttl, err := requestedTTL(req.GetTtlSeconds())
	if err != nil {
		s.refusals.refuse(log, slog.LevelWarn, "bad_ttl", "request refused", "error", err)
		return nil, status.Error(codes.InvalidArgument, "ttl_seconds must not be negative")
	}
	svid, err := j.signer.Sign(a.holder.ID, req.GetAudience(), ttl)
	switch {
	case errors.Is(err, jwtsvid.ErrNoKey):
		s.refusals.refuse(log, slog.LevelWarn, "not_ready", "request refused: no JWT signing key loaded yet")
		return nil, status.Error(codes.Unavailable, msgNoJWTKey)
	case err != nil:
		s.refusals.refuse(log, slog.LevelError, "sign_failed", "JWT-SVID signing failed", "error", err)
		return nil, status.Error(codes.Internal, msgJWTSignErr)
	}
	// The audiences name services, not secrets; the token itself is never
	// logged.
	log.Info("JWT-SVID issued", "audience", svid.Audience, "kid", svid.KeyID, "expires", svid.Expiry.UTC(), "auth", string(a.caller.Method))
	return &jwtsvidpb.MintJWTSVIDResponse{
		Token:     svid.Token,
		SpiffeId:  svid.ID.String(),
		ExpiresAt: svid.Expiry.Unix(),
		IssuedAt:  svid.IssuedAt.Unix(),
	}, nil
}
