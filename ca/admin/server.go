package admin

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"log/slog"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/admin/adminpb"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/peers"
	"github.com/meshid/meshid/ca/rotation"
)

// Config wires a Server.
type Config struct {
	Ledger      *ledger.Ledger
	LedgerKind  string // sqlite or postgres, for status
	DenyList    *DenyList
	Issuers     ca.IssuerSource
	Serving     func() (*x509.Certificate, error) // the CA's own TLS certificate now
	TrustDomain spiffeid.TrustDomain
	CASource    string
	Admins      *Admins
	Rotator     *rotation.Rotator // nil for a plug-in CA
	// Renewal, when set, says when the intermediate is due for renewal and
	// why the last attempt failed (nil: it did not).
	Renewal func() (due time.Time, lastErr error)
	// JWTAuthorities gives the JWT-SVID keys published now, by kid; nil:
	// none.
	JWTAuthorities func() map[string]crypto.PublicKey
	// Federation gives the federated trust domains' state; nil: none.
	Federation func(now time.Time) []peers.Status
	Log        *slog.Logger
	Now        func() time.Time // nil: time.Now
}

// Server implements adminpb.AdminServer.
type Server struct {
	adminpb.UnimplementedAdminServer
	cfg Config
}

// New checks cfg.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Ledger == nil:
		return nil, errors.New("admin: config needs a ledger")
	case cfg.Admins != nil && len(cfg.Admins.IDs) > 0 && cfg.Admins.Issued == nil:
		return nil, errors.New("admin: admin IDs need Admins.Issued to check their certificates are this CA's")
	case cfg.DenyList == nil:
		return nil, errors.New("admin: config needs a deny list")
	case cfg.Issuers == nil:
		return nil, errors.New("admin: config needs issuers")
	case cfg.Admins == nil:
		return nil, errors.New("admin: config needs admins")
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("admin: config needs a trust domain")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Server{cfg: cfg}, nil
}

// Register adds the service to g, behind Interceptor.
func (s *Server) Register(g *grpc.Server) { adminpb.RegisterAdminServer(g, s) }

// actorKey holds the authorized caller in a request's context.
type actorKey struct{}

// Interceptor admits only admins and logs every call with who made it.
func (s *Server) Interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	actor, err := s.cfg.Admins.authorize(ctx)
	if err != nil {
		s.cfg.Log.Warn("admin: call refused", "method", method, "code", status.Code(err).String())
		return nil, err
	}
	resp, err := handler(context.WithValue(ctx, actorKey{}, actor), req)
	s.cfg.Log.Info("admin: call", "method", method, "actor", actor, "code", status.Code(err).String())
	return resp, err
}

func actor(ctx context.Context) string {
	a, _ := ctx.Value(actorKey{}).(string)
	return a
}

// ledgerError maps a ledger failure to a gRPC status; the detail is logged.
func (s *Server) ledgerError(what string, err error) error {
	switch {
	case errors.Is(err, ledger.ErrNotFound):
		return status.Errorf(codes.NotFound, "%s: not found", what)
	case errors.Is(err, ledger.ErrUnavailable), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		s.cfg.Log.Error("admin: ledger failed", "what", what, "error", err)
		return status.Error(codes.Unavailable, "ledger unavailable")
	}
	// What remains are refusals of the request itself (a bad filter or
	// page token); their text is safe and useful to the caller.
	return status.Error(codes.InvalidArgument, err.Error())
}

func (s *Server) ListIdentities(ctx context.Context, req *adminpb.ListIdentitiesRequest) (*adminpb.ListIdentitiesResponse, error) {
	ids, err := s.cfg.Ledger.Identities(ctx, req.GetNamespace(), s.cfg.Now())
	if err != nil {
		return nil, s.ledgerError("identities", err)
	}
	resp := &adminpb.ListIdentitiesResponse{}
	for _, id := range ids {
		resp.Identities = append(resp.Identities, &adminpb.Identity{
			SpiffeId:          id.SPIFFEID,
			Namespace:         id.Namespace,
			ServiceAccount:    id.ServiceAccount,
			ValidCertificates: int32(id.ValidCerts),
			LastIssued:        timestamp(id.LastIssued),
			SoonestExpiry:     timestamp(id.SoonestExpiry),
			Denial:            denialPB(id.Denial),
		})
	}
	return resp, nil
}

func (s *Server) ListCertificates(ctx context.Context, req *adminpb.ListCertificatesRequest) (*adminpb.ListCertificatesResponse, error) {
	if req.GetPageSize() < 0 || req.GetPageSize() > 1000 {
		return nil, status.Error(codes.InvalidArgument, "page_size must be between 0 and 1000")
	}
	if req.GetExpiringWithin() != nil && req.GetExpiringWithin().AsDuration() <= 0 {
		return nil, status.Error(codes.InvalidArgument, "expiring_within must be positive")
	}
	f := ledger.Filter{
		SPIFFEID:       req.GetSpiffeId(),
		Namespace:      req.GetNamespace(),
		PodName:        req.GetPodName(),
		Serial:         strings.ToLower(req.GetSerial()),
		ExpiringWithin: req.GetExpiringWithin().AsDuration(),
		ValidOnly:      req.GetValidOnly(),
		Now:            s.cfg.Now(),
		Limit:          int(req.GetPageSize()),
		PageToken:      req.GetPageToken(),
	}
	if req.GetIssuedSince() != nil {
		f.IssuedSince = req.GetIssuedSince().AsTime()
	}
	page, err := s.cfg.Ledger.Certificates(ctx, f)
	if err != nil {
		return nil, s.ledgerError("certificates", err)
	}
	resp := &adminpb.ListCertificatesResponse{NextPageToken: page.Next}
	for _, r := range page.Records {
		resp.Certificates = append(resp.Certificates, certificatePB(r))
	}
	return resp, nil
}

func (s *Server) GetCertificate(ctx context.Context, req *adminpb.GetCertificateRequest) (*adminpb.Certificate, error) {
	if req.GetSerial() == "" {
		return nil, status.Error(codes.InvalidArgument, "serial is required")
	}
	r, err := s.cfg.Ledger.Certificate(ctx, strings.ToLower(req.GetSerial()))
	if err != nil {
		return nil, s.ledgerError("certificate "+req.GetSerial(), err)
	}
	return certificatePB(r), nil
}

// checkID accepts only workload IDs of this trust domain: what the CA
// could ever issue.
func (s *Server) checkID(raw string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(raw)
	if err != nil {
		return spiffeid.ID{}, status.Errorf(codes.InvalidArgument, "spiffe_id: %v", err)
	}
	if id.TrustDomain() != s.cfg.TrustDomain {
		return spiffeid.ID{}, status.Errorf(codes.InvalidArgument, "spiffe_id: %s is not in trust domain %s", id, s.cfg.TrustDomain)
	}
	return id, nil
}

func (s *Server) DenyIdentity(ctx context.Context, req *adminpb.DenyIdentityRequest) (*adminpb.Denial, error) {
	id, err := s.checkID(req.GetSpiffeId())
	if err != nil {
		return nil, err
	}
	reason := strings.TrimSpace(req.GetReason())
	if reason == "" || len(reason) > 1024 {
		return nil, status.Error(codes.InvalidArgument, "reason is required (at most 1024 bytes)")
	}
	d := ledger.Denial{SPIFFEID: id.String(), Reason: reason, By: actor(ctx), At: s.cfg.Now().UTC()}
	if err := s.cfg.Ledger.Deny(ctx, d); err != nil {
		return nil, s.ledgerError("deny", err)
	}
	s.cfg.DenyList.Deny(d)
	s.cfg.Log.Warn("admin: identity denied", "spiffe_id", d.SPIFFEID, "by", d.By, "reason", d.Reason)
	return denialPB(&d), nil
}

func (s *Server) AllowIdentity(ctx context.Context, req *adminpb.AllowIdentityRequest) (*adminpb.AllowIdentityResponse, error) {
	id, err := s.checkID(req.GetSpiffeId())
	if err != nil {
		return nil, err
	}
	was, err := s.cfg.Ledger.Allow(ctx, id.String(), actor(ctx), s.cfg.Now().UTC())
	if err != nil {
		return nil, s.ledgerError("allow", err)
	}
	s.cfg.DenyList.Allow(id.String())
	if was {
		s.cfg.Log.Warn("admin: identity allowed again", "spiffe_id", id.String(), "by", actor(ctx))
	}
	return &adminpb.AllowIdentityResponse{WasDenied: was}, nil
}

func (s *Server) GetBundle(context.Context, *adminpb.GetBundleRequest) (*adminpb.Bundle, error) {
	is := s.cfg.Issuers.Issuer()
	if is == nil {
		return nil, status.Error(codes.Unavailable, "CA not ready")
	}
	b := &adminpb.Bundle{TrustDomain: s.cfg.TrustDomain.Name()}
	for _, r := range is.Roots() {
		b.Roots = append(b.Roots, r.Raw)
	}
	if s.cfg.JWTAuthorities != nil {
		for kid, key := range s.cfg.JWTAuthorities() {
			der, err := x509.MarshalPKIXPublicKey(key)
			if err != nil {
				return nil, status.Errorf(codes.Internal, "JWT authority %s: %v", kid, err)
			}
			if b.JwtAuthorities == nil {
				b.JwtAuthorities = map[string][]byte{}
			}
			b.JwtAuthorities[kid] = der
		}
	}
	return b, nil
}

func (s *Server) ListFederatedBundles(context.Context, *adminpb.ListFederatedBundlesRequest) (*adminpb.ListFederatedBundlesResponse, error) {
	resp := &adminpb.ListFederatedBundlesResponse{}
	if s.cfg.Federation == nil {
		return resp, nil
	}
	for _, st := range s.cfg.Federation(s.cfg.Now()) {
		fb := &adminpb.FederatedBundle{
			TrustDomain:       st.TrustDomain.Name(),
			BundleEndpointUrl: st.Peer.URL,
			Profile:           string(st.Peer.Profile),
			Source:            st.From,
			Refresh:           durationpb.New(st.Refresh),
			Stale:             st.Stale,
		}
		if !st.Peer.EndpointID.IsZero() {
			fb.EndpointSpiffeId = st.Peer.EndpointID.String()
		}
		if !st.FetchedAt.IsZero() {
			fb.FetchedAt = timestamppb.New(st.FetchedAt)
		}
		if st.LastError != nil {
			fb.LastError = st.LastError.Error()
		}
		if st.Bundle != nil {
			data, err := peers.MarshalBundle(st.Bundle)
			if err != nil {
				return nil, status.Errorf(codes.Internal, "bundle of %s: %v", st.TrustDomain, err)
			}
			fb.Bundle = data
			fb.X509Authorities = int32(len(st.Bundle.X509Authorities()))
			fb.JwtAuthorities = int32(len(st.Bundle.JWTAuthorities()))
		}
		resp.Bundles = append(resp.Bundles, fb)
	}
	return resp, nil
}

func (s *Server) GetStatus(ctx context.Context, _ *adminpb.GetStatusRequest) (*adminpb.Status, error) {
	st := &adminpb.Status{TrustDomain: s.cfg.TrustDomain.Name(), CaSource: s.cfg.CASource,
		Ledger: &adminpb.LedgerStatus{Driver: s.cfg.LedgerKind, Reachable: true}}
	if err := s.cfg.Ledger.Ping(ctx); err != nil {
		s.cfg.Log.Warn("admin: ledger unreachable", "error", err)
		st.Ledger.Reachable, st.Ledger.Error = false, "ledger unreachable (see meshid-ca's log)"
	}
	if is := s.cfg.Issuers.Issuer(); is != nil {
		st.Root = caCertificatePB(is.Root())
		st.Intermediate = caCertificatePB(is.Certificate())
	}
	if s.cfg.Serving != nil {
		if c, err := s.cfg.Serving(); err == nil {
			st.Serving = caCertificatePB(c)
		}
	}
	if s.cfg.Renewal != nil {
		due, err := s.cfg.Renewal()
		st.IntermediateRenewalDue = timestamp(due)
		if err != nil {
			st.IntermediateRenewalError = err.Error()
		}
	}
	st.Ready = st.Root != nil && st.Ledger.Reachable
	return st, nil
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func certificatePB(r ledger.Record) *adminpb.Certificate {
	return &adminpb.Certificate{
		Serial:            r.Serial,
		SpiffeId:          r.SPIFFEID,
		Namespace:         r.Namespace,
		ServiceAccount:    r.ServiceAccount,
		PodName:           r.PodName,
		PodUid:            r.PodUID,
		ClusterId:         r.ClusterID,
		PublicKeySha256:   r.PublicKeySHA256,
		NotBefore:         timestamp(r.NotBefore),
		NotAfter:          timestamp(r.NotAfter),
		IssuerFingerprint: r.IssuerFingerprint,
		AuthMethod:        r.AuthMethod,
		IssuedAt:          timestamp(r.IssuedAt),
		RequestedBy:       r.RequestedBy,
	}
}

func denialPB(d *ledger.Denial) *adminpb.Denial {
	if d == nil {
		return nil
	}
	return &adminpb.Denial{SpiffeId: d.SPIFFEID, Reason: d.Reason, DeniedBy: d.By, DeniedAt: timestamp(d.At)}
}

func caCertificatePB(c *x509.Certificate) *adminpb.CACertificate {
	return &adminpb.CACertificate{
		Subject:           c.Subject.String(),
		FingerprintSha256: ca.Fingerprint(c),
		NotBefore:         timestamp(c.NotBefore),
		NotAfter:          timestamp(c.NotAfter),
	}
}
