package workloadapi

import (
	"context"
	"crypto"
	"crypto/x509"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
)

// Resolver decides which workload a caller is (pod mode: the pod itself).
type Resolver interface {
	Resolve(ctx context.Context) (*agent.Handle, error)
}

// Bundle is the trust bundle; *agent.Bundle is one.
type Bundle interface {
	Roots() []*x509.Certificate
	Federated() map[spiffeid.TrustDomain]*spiffebundle.Bundle
	JWTAuthorities() map[string]crypto.PublicKey
	Changed() <-chan struct{}
}

// Server serves the SPIFFE Workload API: X.509-SVIDs and bundles
// (FetchX509SVID, FetchX509Bundles), and JWT-SVIDs (FetchJWTSVID,
// FetchJWTBundles, ValidateJWTSVID), with the federated trust domains'
// bundles beside the own one.
type Server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer

	td       spiffeid.TrustDomain
	resolver Resolver
	bundle   Bundle
	log      *slog.Logger
}

// New serves the workloads resolver finds, with bundle as trust domain td's
// roots.
func New(td spiffeid.TrustDomain, resolver Resolver, bundle Bundle, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{td: td, resolver: resolver, bundle: bundle, log: log}
}

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) { workload.RegisterSpiffeWorkloadAPIServer(g, s) }

// checkHeader enforces the Workload API's security header, which keeps
// browsers and other confused deputies from reaching the API.
func checkHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

// federatedDER is each federated trust domain's X.509 authorities, keyed by
// trust domain ID as the Workload API has them; those with only JWT
// authorities are left out.
func federatedDER(fed map[spiffeid.TrustDomain]*spiffebundle.Bundle) map[string][]byte {
	if len(fed) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(fed))
	for td, b := range fed {
		if roots := b.X509Authorities(); len(roots) > 0 {
			out[td.IDString()] = concatDER(roots)
		}
	}
	return out
}

func concatDER(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

// FetchX509SVID streams the caller's SVID and bundle, again at every change.
func (s *Server) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	w, err := s.resolver.Resolve(ctx)
	if err != nil {
		return err
	}
	defer w.Release()
	var expired <-chan time.Time
	if until := w.Until(); !until.IsZero() {
		expired = time.After(time.Until(until))
	}
	for {
		wch, bch := w.Changed(), s.bundle.Changed()
		if svid := w.SVID(); svid != nil {
			resp := &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
				SpiffeId:    svid.ID.String(),
				X509Svid:    svid.ChainDER(),
				X509SvidKey: svid.KeyDER(),
				Bundle:      concatDER(s.bundle.Roots()),
			}}, FederatedBundles: federatedDER(s.bundle.Federated())}
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-expired:
			return status.Error(codes.Unauthenticated, "workloadapi: the caller's token expired; reconnect with a fresh one")
		case <-wch:
		case <-bch:
		}
	}
}

// FetchX509Bundles streams the trust bundle, again at every change.
func (s *Server) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	for {
		ch := s.bundle.Changed()
		if roots := s.bundle.Roots(); len(roots) > 0 {
			bundles := federatedDER(s.bundle.Federated())
			if bundles == nil {
				bundles = map[string][]byte{}
			}
			bundles[s.td.IDString()] = concatDER(roots)
			if err := stream.Send(&workload.X509BundlesResponse{Bundles: bundles}); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		}
	}
}
