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

// Refusals of admission and issuance (admit, issue): IssuePod returns
// them for the signer to turn into Denied or Failed; the gRPC services
// turn them into status codes (grpcError).
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
	a := &authorized{
		holder: nodeauth.Workload{ID: id, Namespace: r.Namespace, ServiceAccount: r.ServiceAccount},
		caller: caller,
		log:    s.log.With("spiffe_id", id.String(), "pod", podRef(caller), "node", r.NodeName),
	}
	release, err := s.admit(a)
	if err != nil {
		return nil, err
	}
	defer release()
	cert, err := s.issue(ctx, a, r.PublicKey, r.TTL, "pod certificate issued")
	if err != nil {
		return nil, err
	}
	s.metrics.podCertificates.Inc()
	return cert, nil
}
