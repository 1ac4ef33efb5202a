package workloadapi

import (
	"context"
	"errors"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshid/meshid/agent"
)

// jwtBundles is every trust domain's JWT-SVID keys held now: the own
// ones and the federated trust domains' that have any.
func (s *Server) jwtBundles() *jwtbundle.Set {
	set := jwtbundle.NewSet()
	if own := s.bundle.JWTAuthorities(); len(own) > 0 {
		set.Add(jwtbundle.FromJWTAuthorities(s.td, own))
	}
	for td, b := range s.bundle.Federated() {
		if keys := b.JWTAuthorities(); len(keys) > 0 && td != s.td {
			set.Add(jwtbundle.FromJWTAuthorities(td, keys))
		}
	}
	return set
}

// FetchJWTSVID returns a JWT-SVID of the caller's identity for the
// audiences asked.
func (s *Server) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if len(req.GetAudience()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	w, err := s.resolver.Resolve(ctx)
	if err != nil {
		return nil, err
	}
	defer w.Release()
	if want := req.GetSpiffeId(); want != "" && want != w.ID().String() {
		return nil, status.Errorf(codes.PermissionDenied, "workloadapi: the caller is %s, not %s", w.ID(), clip(want))
	}
	svid, err := w.JWTSVID(ctx, req.GetAudience())
	switch {
	case errors.Is(err, agent.ErrNoJWT):
		return nil, status.Error(codes.Unimplemented, "workloadapi: this agent issues no JWT-SVIDs")
	case err != nil:
		code := status.Code(err)
		if code == codes.Unknown {
			code = codes.Unavailable
		}
		s.log.Warn("JWT-SVID not issued", "spiffe_id", w.ID().String(), "error", err)
		return nil, status.Errorf(code, "workloadapi: JWT-SVID not issued: %s", status.Convert(err).Message())
	}
	return &workload.JWTSVIDResponse{Svids: []*workload.JWTSVID{{SpiffeId: svid.ID.String(), Svid: svid.Token}}}, nil
}

// FetchJWTBundles streams every trust domain's JWT-SVID keys as JWKS
// documents, again at every change.
func (s *Server) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	for {
		ch := s.bundle.Changed()
		out := map[string][]byte{}
		for _, b := range s.jwtBundles().Bundles() {
			doc, err := b.Marshal()
			if err != nil {
				return status.Errorf(codes.Internal, "workloadapi: encoding the JWT bundle of %s: %v", b.TrustDomain(), err)
			}
			out[b.TrustDomain().IDString()] = doc
		}
		// An empty set is sent too: go-spiffe's source waits for a first
		// answer, and "no keys" is one.
		if err := stream.Send(&workload.JWTBundlesResponse{Bundles: out}); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		}
	}
}

// ValidateJWTSVID checks a JWT-SVID against the JWT keys held for its
// trust domain (the own one or a federated one) and the audience given,
// as the SPIFFE JWT-SVID specification says, and returns its claims.
func (s *Server) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	switch {
	case req.GetAudience() == "":
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	case req.GetSvid() == "":
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	svid, err := jwtsvid.ParseAndValidate(req.GetSvid(), s.jwtBundles(), []string{req.GetAudience()})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "workloadapi: JWT-SVID refused: %v", err)
	}
	claims, err := structpb.NewStruct(svid.Claims)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "workloadapi: the JWT-SVID's claims: %v", err)
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

func clip(s string) string {
	if len(s) > 128 {
		return s[:128] + "…"
	}
	return s
}
