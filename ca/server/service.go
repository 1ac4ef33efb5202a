package server

import (
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/csr"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/nodeauth"
)

// Messages returned to clients. Short and stable: clients and tests may match
// them; the detail is in the CA's log.
const (
	msgNoToken         = "missing bearer token"
	msgAuthFailed      = "authentication failed"
	msgAuthUnavailable = "authentication unavailable"
	msgRateLimited     = "rate limit exceeded for this identity"
	msgNamespaceLimit  = "rate limit exceeded for this namespace"
	msgGlobalLimit     = "CA-wide rate limit exceeded"
	msgNegativeTTL     = "validity_duration must not be negative"
	msgImpersonation   = "impersonation is not supported: this CA has no node proxies (--node-proxy-service-accounts)"
	msgImpersonationNo = "impersonation refused"
	msgNodeProxyWait   = "node proxy check unavailable"
	msgNotReady        = "CA not ready"
	msgSignFailed      = "signing failed"
	msgDenied          = "identity denied by an administrator"
	msgNotRecorded     = "issuance ledger unavailable"
)

// Recorder keeps the durable record of issued certificates;
// *ledger.Ledger is one. Record returns once r is committed.
type Recorder interface {
	Record(ctx context.Context, r ledger.Record) error
}

// DenyList says whether an administrator has cut an identity off;
// *admin.DenyList is one. An issuance holds Guard from its check until it
// returns, and checks again before it returns a certificate, so that a
// deny made on this replica holds at once for requests already past the
// first check.
type DenyList interface {
	Denied(spiffeID string) bool
	Guard() (release func())
}

// NodeProxies decides whether a node proxy may have the certificate of the
// identity it names in ImpersonatedIdentity; *nodeauth.Authorizer is one.
type NodeProxies interface {
	Authorize(caller k8sauth.Caller, requested string) (nodeauth.Workload, error)
}

// Config wires a [CertificateService].
type Config struct {
	Authority   *ca.Authority
	Auth        k8sauth.Authenticator
	TrustDomain spiffeid.TrustDomain
	Limits      Limits
	// Ledger records every certificate before it is returned; when it
	// cannot, nothing is returned (Unavailable).
	Ledger   Recorder
	DenyList DenyList
	// NodeProxies, when set, lets node proxies ask for the workloads on
	// their node; nil refuses every ImpersonatedIdentity.
	NodeProxies NodeProxies
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
	ledger    Recorder
	denyList  DenyList
	nodeAuth  NodeProxies
	metrics   *Metrics
	log       *slog.Logger
	refusals  *refusalLog
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
	case cfg.Ledger == nil:
		return nil, errors.New("server: config needs a ledger")
	case cfg.DenyList == nil:
		return nil, errors.New("server: config needs a deny list")
	}
	s := &CertificateService{
		authority: cfg.Authority,
		auth:      cfg.Auth,
		td:        cfg.TrustDomain,
		ledger:    cfg.Ledger,
		denyList:  cfg.DenyList,
		nodeAuth:  cfg.NodeProxies,
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
	s.refusals = newRefusalLog(s.log, s.metrics, s.now)
	if cfg.Limits.Pod.on() || cfg.Limits.Namespace.on() || cfg.Limits.Global.on() {
		s.limiter = newLimiter(cfg.Limits, s.now)
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
	var impersonated *string
	if v, ok := req.GetMetadata().GetFields()["ImpersonatedIdentity"]; ok {
		impersonated = ptr(v.GetStringValue())
	}
	a, release, err := s.authorize(ctx, impersonated)
	if err != nil {
		return nil, err
	}
	defer release()
	holder, log := a.holder, a.log
	ttl, err := requestedTTL(req.GetValidityDuration())
	if err != nil {
		s.refusals.refuse(log, slog.LevelWarn, "bad_ttl", "request refused", "error", err)
		return nil, status.Error(codes.InvalidArgument, msgNegativeTTL)
	}
	pub, err := csr.Validate([]byte(req.GetCsr()), holder.ID)
	if err != nil {
		s.refusals.refuse(log, slog.LevelWarn, "csr", "request refused", "error", err)
		if errors.Is(err, csr.ErrNotCaller) {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cert, err := s.issue(ctx, a, pub, ttl, "certificate issued")
	if err != nil {
		return nil, grpcError(err)
	}
	return &pb.IstioCertificateResponse{CertChain: cert.ChainPEM}, nil
}

func ptr[T any](v T) *T { return &v }

// authorized is a caller found entitled to a credential.
type authorized struct {
	// holder is the identity the credential is for: the caller's own, or
	// for a node proxy the workload's it names.
	holder      nodeauth.Workload
	caller      k8sauth.Caller
	requestedBy string // the node proxy's ID, when it asks for another
	claimed     string // the cluster ID the caller sent
	log         *slog.Logger
}

// authorize authenticates the caller by its bearer token and decides
// whether it may have a credential now: for itself, or (impersonated not
// nil) for the workload a node proxy names; not denied, within the rate
// limits. It returns the gRPC error to send when not. On success the deny
// list's Guard is held until release is called.
func (s *CertificateService) authorize(ctx context.Context, impersonated *string) (*authorized, func(), error) {
	md, _ := metadata.FromIncomingContext(ctx)
	token, err := k8sauth.BearerToken(md)
	if err != nil {
		s.metrics.authFailures.WithLabelValues("no_token").Inc()
		s.refusals.refuse(s.log, slog.LevelWarn, "no_token", "request refused", "error", err)
		return nil, nil, status.Error(codes.Unauthenticated, msgNoToken)
	}
	claimed := clusterID(md)
	caller, err := s.auth.Authenticate(k8sauth.WithCluster(k8sauth.WithPeer(ctx, peerAddress(ctx)), claimed), token)
	if err != nil {
		reason := k8sauth.Reason(err)
		s.metrics.authFailures.WithLabelValues(reason).Inc()
		s.refusals.refuse(s.log, slog.LevelWarn, reason, "authentication failed", "error", err)
		if errors.Is(err, k8sauth.ErrUnavailable) {
			return nil, nil, status.Error(codes.Unavailable, msgAuthUnavailable)
		}
		return nil, nil, status.Error(codes.Unauthenticated, msgAuthFailed)
	}
	id, err := caller.ID(s.td)
	if err != nil {
		s.refusals.refuse(s.log, slog.LevelWarn, "bad_identity", "authenticated caller has no valid SPIFFE ID", "namespace", caller.Namespace, "service_account", caller.ServiceAccount, "error", err)
		return nil, nil, status.Error(codes.Unauthenticated, msgAuthFailed)
	}
	a := &authorized{
		holder:  nodeauth.Workload{ID: id, Namespace: caller.Namespace, ServiceAccount: caller.ServiceAccount},
		caller:  caller,
		claimed: claimed,
		log:     s.log.With("spiffe_id", id.String(), "pod", podRef(caller)),
	}
	if impersonated != nil {
		w, err := s.impersonate(caller, *impersonated, a.log)
		if err != nil {
			return nil, nil, err
		}
		a.holder, a.requestedBy = w, id.String()
		a.log = a.log.With("for", w.ID.String())
	}
	release, err := s.admit(a)
	if err != nil {
		return nil, nil, grpcError(err)
	}
	return a, release, nil
}

// admit decides whether a's holder may have a credential now: not denied,
// within the rate limits. On success the deny list's Guard is held until
// release is called; refusals are logged and counted, and returned as
// ErrDenied or ErrRateLimited.
func (s *CertificateService) admit(a *authorized) (release func(), err error) {
	release = s.denyList.Guard()
	if s.denied(a.holder.ID, a.requestedBy) {
		release()
		s.refusals.refuse(a.log, slog.LevelWarn, "denied", "request refused")
		return nil, ErrDenied
	}
	if ok, scope := s.limiter.allow(limitKey(a.holder.ID, a.caller, a.requestedBy != ""), a.holder.Namespace); !ok {
		release()
		s.metrics.rateLimited.WithLabelValues(scope).Inc()
		s.refusals.refuse(a.log, slog.LevelWarn, "rate_limited", "request refused", "scope", scope)
		return nil, &rateLimitError{scope: scope}
	}
	return release, nil
}

// rateLimitError is ErrRateLimited in one scope.
type rateLimitError struct{ scope string }

func (e *rateLimitError) Error() string   { return ErrRateLimited.Error() + " (" + e.scope + ")" }
func (e *rateLimitError) Is(t error) bool { return t == ErrRateLimited }

// errSignFailed: the authority failed for another reason than having no
// CA loaded.
var errSignFailed = errors.New("server: signing failed")

// issue signs holder's certificate for pub, records it, and returns it
// unless the holder was denied meanwhile; call it holding the Guard from
// admit. Refusals are logged and counted, and returned as ca.ErrNoIssuer,
// errSignFailed, ErrNotRecorded (wrapping ledger.ErrUnavailable when the
// ledger or the caller went away) or ErrDenied.
func (s *CertificateService) issue(ctx context.Context, a *authorized, pub crypto.PublicKey, ttl time.Duration, issued string) (*ca.Certificate, error) {
	holder, caller, log := a.holder, a.caller, a.log
	cert, err := s.authority.Issue(ca.Request{ID: holder.ID, PublicKey: pub, TTL: ttl})
	if err != nil {
		if errors.Is(err, ca.ErrNoIssuer) {
			s.refusals.refuse(log, slog.LevelWarn, "not_ready", "request refused: no CA certificate loaded yet")
			return nil, err
		}
		s.refusals.refuse(log, slog.LevelError, "sign_failed", "signing failed", "error", err)
		return nil, errSignFailed
	}
	serial := fmt.Sprintf("%x", cert.Leaf.SerialNumber)
	cluster := caller.Cluster // the cluster that verified the token
	if cluster == "" {
		cluster = a.claimed // an authenticator that knows one cluster and no name for it
	}
	rec := record(cert, holder, caller, a.requestedBy, cluster, s.now())
	start := s.now()
	err = s.ledger.Record(ctx, rec)
	s.metrics.ledgerWrites.Observe(s.now().Sub(start).Seconds())
	if err != nil {
		// Signed but never returned: a certificate no one holds.
		s.refusals.refuse(log, slog.LevelError, "not_recorded", "certificate not recorded; not returned", "serial", serial, "error", err)
		if ctx.Err() != nil && !errors.Is(err, ledger.ErrUnavailable) {
			err = fmt.Errorf("%w: %w", ledger.ErrUnavailable, err)
		}
		return nil, fmt.Errorf("%w: %w", ErrNotRecorded, err)
	}
	if s.denied(holder.ID, a.requestedBy) {
		// Denied while it was being signed: recorded, never returned.
		s.refusals.refuse(log, slog.LevelWarn, "denied", "request refused", "serial", serial)
		return nil, ErrDenied
	}
	log.Info(issued,
		"serial", serial,
		"not_after", cert.Leaf.NotAfter.UTC(),
		"auth", string(caller.Method))
	return cert, nil
}

// grpcError is the status a client gets for an error of admit or issue.
func grpcError(err error) error {
	var limited *rateLimitError
	switch {
	case errors.Is(err, ErrDenied):
		return status.Error(codes.PermissionDenied, msgDenied)
	case errors.As(err, &limited):
		msg := map[string]string{scopePod: msgRateLimited, scopeNamespace: msgNamespaceLimit, scopeGlobal: msgGlobalLimit}[limited.scope]
		return status.Error(codes.ResourceExhausted, msg)
	case errors.Is(err, ca.ErrNoIssuer):
		return status.Error(codes.Unavailable, msgNotReady)
	case errors.Is(err, ErrNotRecorded) && errors.Is(err, ledger.ErrUnavailable):
		return status.Error(codes.Unavailable, msgNotRecorded)
	case errors.Is(err, ErrNotRecorded):
		return status.Error(codes.Internal, msgNotRecorded)
	}
	return status.Error(codes.Internal, msgSignFailed)
}

// impersonate decides a node proxy's request for the identity requested
// (its ImpersonatedIdentity), returning the workload or the gRPC error.
func (s *CertificateService) impersonate(caller k8sauth.Caller, requested string, log *slog.Logger) (nodeauth.Workload, error) {
	if s.nodeAuth == nil {
		s.metrics.nodeProxy.WithLabelValues("not_enabled").Inc()
		s.refusals.refuse(log, slog.LevelWarn, "impersonation", "request refused", "detail", "no node proxies configured")
		return nodeauth.Workload{}, status.Error(codes.PermissionDenied, msgImpersonation)
	}
	w, err := s.nodeAuth.Authorize(caller, requested)
	var refused *nodeauth.Error
	switch {
	case err == nil:
		s.metrics.nodeProxy.WithLabelValues("allowed").Inc()
		return w, nil
	case errors.Is(err, nodeauth.ErrUnavailable):
		s.metrics.nodeProxy.WithLabelValues("unavailable").Inc()
		s.refusals.refuse(log, slog.LevelWarn, "node_proxy_unavailable", "node proxy request not decided", "error", err)
		return nodeauth.Workload{}, status.Error(codes.Unavailable, msgNodeProxyWait)
	case errors.As(err, &refused):
		s.metrics.nodeProxy.WithLabelValues(refused.Reason).Inc()
	default:
		s.metrics.nodeProxy.WithLabelValues("error").Inc()
	}
	s.refusals.refuse(log, slog.LevelWarn, "impersonation", "request refused", "error", err)
	return nodeauth.Workload{}, status.Error(codes.PermissionDenied, msgImpersonationNo)
}

// denied says whether the holder, or the node proxy asking for it, is cut
// off.
func (s *CertificateService) denied(holder spiffeid.ID, requestedBy string) bool {
	return s.denyList.Denied(holder.String()) || (requestedBy != "" && s.denyList.Denied(requestedBy))
}

// record is the ledger's entry for cert: whose it is, who asked and how
// they proved it, and nothing secret.
func record(cert *ca.Certificate, holder nodeauth.Workload, caller k8sauth.Caller, requestedBy, cluster string, now time.Time) ledger.Record {
	spki := sha256.Sum256(cert.Leaf.RawSubjectPublicKeyInfo)
	return ledger.Record{
		Serial:            fmt.Sprintf("%x", cert.Leaf.SerialNumber),
		SPIFFEID:          holder.ID.String(),
		Namespace:         holder.Namespace,
		ServiceAccount:    holder.ServiceAccount,
		RequestedBy:       requestedBy,
		PodName:           caller.PodName,
		PodUID:            caller.PodUID,
		ClusterID:         cluster,
		PublicKeySHA256:   hex.EncodeToString(spki[:]),
		NotBefore:         cert.Leaf.NotBefore,
		NotAfter:          cert.Leaf.NotAfter,
		IssuerFingerprint: cert.Issuer.Fingerprint(),
		AuthMethod:        string(caller.Method),
		IssuedAt:          now,
	}
}

// clusterID is what Istio's agent sends as "clusterid" (may be empty).
func clusterID(md metadata.MD) string {
	if v := md.Get("clusterid"); len(v) == 1 && len(v[0]) <= 253 {
		return v[0]
	}
	return ""
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

// limitKey is what the rate limit counts by: the pod a token is bound to,
// so that a Deployment of a thousand replicas restarting at once is not
// held back by its one service account, while one pod asking in a loop is;
// the identity for tokens bound to no pod. A node proxy asks for every
// workload on its node: its pod and the workload's identity together.
func limitKey(id spiffeid.ID, c k8sauth.Caller, forOther bool) string {
	if forOther {
		return "pod:" + c.PodUID + "/" + id.String()
	}
	if c.PodUID != "" {
		return "pod:" + c.PodUID
	}
	return id.String()
}

// peerAddress is the client's IP: TokenReviews are shared fairly between
// addresses, and in a cluster each pod has its own.
func peerAddress(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if a, ok := p.Addr.(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return p.Addr.String()
}

func podRef(c k8sauth.Caller) string {
	if c.PodName == "" {
		return ""
	}
	return c.Namespace + "/" + c.PodName
}
