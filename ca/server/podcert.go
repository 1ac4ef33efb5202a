package server

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/nodeauth"
)

// MethodPodCertificate is how a pod-certificate request proves its pod:
// the kubelet filed it, and the signer checked it against the live pod,
// service account and node.
const MethodPodCertificate k8sauth.Method = "pod-certificate"

// PodRequest is a Kubernetes PodCertificateRequest that the signer has
// checked against the objects it names.
type PodRequest struct {
	Namespace      string
	ServiceAccount string
	PodName        string
	PodUID         string
	NodeName       string
	PublicKey      crypto.PublicKey
	TTL            time.Duration // clamped as any request's
}

// Refusals of IssuePod, for the signer to turn into Denied or Failed.
var (
	ErrDenied      = errors.New("server: identity denied by an administrator")
	ErrRateLimited = errors.New("server: rate limit exceeded")
	ErrNotRecorded = errors.New("server: issuance ledger unavailable")
)

// IssuePod signs a pod's certificate as CreateCertificate would for the
// pod's own token: the same identity, deny list, rate limits, TTL clamp,
// signing and ledger record, with the same logs and metrics.
func (s *CertificateService) IssuePod(ctx context.Context, r PodRequest) (*ca.Certificate, error) {
	caller := k8sauth.Caller{Namespace: r.Namespace, ServiceAccount: r.ServiceAccount, PodName: r.PodName, PodUID: r.PodUID, Method: MethodPodCertificate}
	id, err := caller.ID(s.td)
	if err != nil {
		s.refusals.refuse(s.log, slog.LevelWarn, "bad_identity", "pod certificate refused: no valid SPIFFE ID", "namespace", r.Namespace, "service_account", r.ServiceAccount, "error", err)
		return nil, fmt.Errorf("server: %w", err)
	}
	holder := nodeauth.Workload{ID: id, Namespace: r.Namespace, ServiceAccount: r.ServiceAccount}
	log := s.log.With("spiffe_id", id.String(), "pod", podRef(caller), "node", r.NodeName)
	defer s.denyList.Guard()()
	if s.denied(id, "") {
		s.refusals.refuse(log, slog.LevelWarn, "denied", "pod certificate refused")
		return nil, ErrDenied
	}
	if ok, scope := s.limiter.allow(limitKey(id, caller, false), r.Namespace); !ok {
		s.metrics.rateLimited.WithLabelValues(scope).Inc()
		s.refusals.refuse(log, slog.LevelWarn, "rate_limited", "pod certificate refused", "scope", scope)
		return nil, fmt.Errorf("%w (%s)", ErrRateLimited, scope)
	}
	cert, err := s.authority.Issue(ca.Request{ID: id, PublicKey: r.PublicKey, TTL: r.TTL})
	if err != nil {
		reason := "sign_failed"
		if errors.Is(err, ca.ErrNoIssuer) {
			reason = "not_ready"
		}
		s.refusals.refuse(log, slog.LevelWarn, reason, "pod certificate not signed", "error", err)
		return nil, err
	}
	rec := record(cert, holder, caller, "", "", s.now())
	start := s.now()
	err = s.ledger.Record(ctx, rec)
	s.metrics.ledgerWrites.Observe(s.now().Sub(start).Seconds())
	if err != nil {
		s.refusals.refuse(log, slog.LevelError, "not_recorded", "certificate not recorded; not returned", "serial", rec.Serial, "error", err)
		return nil, fmt.Errorf("%w: %w", ErrNotRecorded, err)
	}
	if s.denied(id, "") {
		s.refusals.refuse(log, slog.LevelWarn, "denied", "pod certificate refused", "serial", rec.Serial)
		return nil, ErrDenied
	}
	s.metrics.podCertificates.Inc()
	log.Info("pod certificate issued", "serial", rec.Serial, "not_after", cert.Leaf.NotAfter.UTC(), "auth", string(MethodPodCertificate))
	return cert, nil
}
