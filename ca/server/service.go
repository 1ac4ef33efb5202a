package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/csr"
	"github.com/meshid/meshid/ca/k8sauth"
)

// Messages returned to clients. Short and stable: clients and tests may match
// them; the detail is in the CA's log.
const (
	msgNoToken         = "missing bearer token"
	msgAuthFailed      = "authentication failed"
	msgAuthUnavailable = "authentication unavailable"
	msgRateLimited     = "rate limit exceeded for this identity"
	msgNegativeTTL     = "validity_duration must not be negative"
	msgImpersonation   = "impersonation is not supported"
	msgNotReady        = "CA not ready"
	msgSignFailed      = "signing failed"
)

// Config wires a [CertificateService].
type Config struct {
	Authority   *ca.Authority
	Auth        k8sauth.Authenticator
	TrustDomain spiffeid.TrustDomain
	RateLimit   rate.Limit // certificates per second per identity; 0 disables
	RateBurst   int
	Metrics     *Metrics
	Log         *slog.Logger
	Now         func() time.Time // nil means time.Now
}

// CertificateService implements Istio's CreateCertificate.
type CertificateService struct {
	pb.UnimplementedIstioCertificateServiceServer

	authority *ca.Authority
	auth      k8sauth.Authenticator
	td        spiffeid.TrustDomain
	limiter   *limiter
	metrics   *Metrics
	log       *slog.Logger
	now       func() time.Time
}

// NewCertificateService checks cfg and returns the service.
func NewCertificateService(cfg Config) (*CertificateService, error) {
	switch {
	case cfg.Authority == nil:
		return nil, errors.New("server: config needs an authority")
	case cfg.Auth == nil:
		return nil, errors.New("server: config needs an authenticator")
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("server: config needs a trust domain")
	case cfg.Metrics == nil:
		return nil, errors.New("server: config needs metrics")
	}
	s := &CertificateService{
		authority: cfg.Authority,
		auth:      cfg.Auth,
		td:        cfg.TrustDomain,
		metrics:   cfg.Metrics,
		log:       cfg.Log,
		now:       cfg.Now,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if cfg.RateLimit > 0 {
		s.limiter = newLimiter(cfg.RateLimit, cfg.RateBurst, s.now)
	}
	return s, nil
}

// CreateCertificate authenticates the caller, checks the CSR against the
// caller's identity, and returns a signed chain, leaf first and root last.
func (s *CertificateService) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	start := s.now()
	resp, err := s.createCertificate(ctx, req)
	code := status.Code(err)
	s.metrics.requests.WithLabelValues(code.String()).Inc()
	if err == nil {
		s.metrics.issuance.Observe(s.now().Sub(start).Seconds())
	}
	return resp, err
}

func (s *CertificateService) createCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	token, err := bearerToken(md)
	if err != nil {
		s.metrics.authFailures.WithLabelValues("no_token").Inc()
		s.log.Warn("request refused", "reason", "no_token", "error", err)
		return nil, status.Error(codes.Unauthenticated, msgNoToken)
	}
	caller, err := s.auth.Authenticate(ctx, token)
	if err != nil {
		reason := k8sauth.Reason(err)
		s.metrics.authFailures.WithLabelValues(reason).Inc()
		s.log.Warn("authentication failed", "reason", reason, "error", err)
		if errors.Is(err, k8sauth.ErrUnavailable) {
			return nil, status.Error(codes.Unavailable, msgAuthUnavailable)
		}
		return nil, status.Error(codes.Unauthenticated, msgAuthFailed)
	}
	id, err := caller.ID(s.td)
	if err != nil {
		s.log.Warn("authenticated caller has no valid SPIFFE ID", "namespace", caller.Namespace, "service_account", caller.ServiceAccount, "error", err)
		return nil, status.Error(codes.Unauthenticated, msgAuthFailed)
	}
	log := s.log.With("spiffe_id", id.String(), "pod", podRef(caller))
	if _, ok := req.GetMetadata().GetFields()["ImpersonatedIdentity"]; ok {
		log.Warn("request refused", "reason", "impersonation")
		return nil, status.Error(codes.PermissionDenied, msgImpersonation)
	}
	if !s.limiter.allow(id.String()) {
		log.Warn("request refused", "reason", "rate_limited")
		return nil, status.Error(codes.ResourceExhausted, msgRateLimited)
	}
	ttl, err := requestedTTL(req.GetValidityDuration())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, msgNegativeTTL)
	}
	pub, err := csr.Validate([]byte(req.GetCsr()), id)
	if err != nil {
		log.Warn("request refused", "reason", "csr", "error", err)
		if errors.Is(err, csr.ErrNotCaller) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cert, err := s.authority.Issue(ca.Request{ID: id, PublicKey: pub, TTL: ttl})
	if err != nil {
		if errors.Is(err, ca.ErrNoIssuer) {
			return nil, status.Error(codes.Unavailable, msgNotReady)
		}
		log.Error("signing failed", "error", err)
		return nil, status.Error(codes.Internal, msgSignFailed)
	}
	log.Info("certificate issued",
		"serial", fmt.Sprintf("%x", cert.Leaf.SerialNumber),
		"not_after", cert.Leaf.NotAfter.UTC(),
		"auth", string(caller.Method))
	return &pb.IstioCertificateResponse{CertChain: cert.ChainPEM}, nil
}

// bearerToken reads the one authorization header, "Bearer <token>".
func bearerToken(md metadata.MD) (string, error) {
	vals := md.Get("authorization")
	if len(vals) != 1 {
		return "", fmt.Errorf("want one authorization header, got %d", len(vals))
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(token) == "" {
		return "", errors.New("authorization header is not a bearer token")
	}
	return strings.TrimSpace(token), nil
}

// requestedTTL converts validity_duration seconds; huge values are left for
// the authority to clamp instead of overflowing.
func requestedTTL(seconds int64) (time.Duration, error) {
	switch {
	case seconds < 0:
		return 0, errors.New("negative validity_duration")
	case seconds > math.MaxInt64/int64(time.Second):
		return math.MaxInt64, nil
	}
	return time.Duration(seconds) * time.Second, nil
}

func podRef(c k8sauth.Caller) string {
	if c.PodName == "" {
		return ""
	}
	return c.Namespace + "/" + c.PodName
}
