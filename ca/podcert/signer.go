package podcert

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	certsv1beta1 "k8s.io/api/certificates/v1beta1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/server"
)

// DefaultSignerName is meshid's signer name.
const DefaultSignerName = "meshid.dev/spiffe"

// MinLifetime is the shortest certificate the API server accepts for a
// PodCertificateRequest.
const MinLifetime = time.Hour

// Reasons on the Denied and Failed conditions meshid sets.
const (
	ReasonPodMismatch        = "PodMismatch"
	ReasonUnsupportedKeyType = certsv1beta1.PodCertificateRequestConditionUnsupportedKeyType
	ReasonBadProof           = "InvalidProofOfPossession"
	ReasonIdentityDenied     = "IdentityDenied"
	ReasonLifetime           = "LifetimeTooShort"
	ReasonSigningFailed      = "SigningFailed"
	ReasonIssued             = "Issued"
	ReasonUserConfig         = certsv1beta1.PodCertificateRequestConditionInvalidUserConfig
)

// Issuer signs a checked request; *server.CertificateService is one.
type Issuer interface {
	IssuePod(ctx context.Context, r server.PodRequest) (*ca.Certificate, error)
}

// Signer answers the PodCertificateRequests of one signer name. Run it on
// the elected replica only: two signers would race to set one status.
type Signer struct {
	Client kubernetes.Interface
	Name   string // default DefaultSignerName
	Issuer Issuer
	// MaxTTL is meshid's longest certificate (--max-cert-ttl) and
	// Backdate how far before now NotBefore is set: a request's
	// certificate lives min(maxExpirationSeconds, MaxTTL+Backdate).
	MaxTTL   time.Duration
	Backdate time.Duration
	// RefreshFraction is how far into its life a certificate is renewed
	// (beginRefreshAt); default 0.5, as meshid-agent renews.
	RefreshFraction float64
	Workers         int // default 2
	Log             *slog.Logger
	Now             func() time.Time

	status func(context.Context, *certsv1beta1.PodCertificateRequest) error // in the API version served
}

// refusal is a terminal answer: Denied or Failed with a reason.
type refusal struct {
	condition, reason, message string
}

func (r *refusal) Error() string { return r.condition + " (" + r.reason + "): " + r.message }

func deny(reason, format string, args ...any) *refusal {
	return &refusal{certsv1beta1.PodCertificateRequestConditionTypeDenied, reason, fmt.Sprintf(format, args...)}
}

func fail(reason, format string, args ...any) *refusal {
	return &refusal{certsv1beta1.PodCertificateRequestConditionTypeFailed, reason, fmt.Sprintf(format, args...)}
}

func (s *Signer) defaults() {
	if s.Name == "" {
		s.Name = DefaultSignerName
	}
	if s.Workers <= 0 {
		s.Workers = 2
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	if s.Now == nil {
		s.Now = time.Now
	}
}

// Run answers requests until ctx ends.
func (s *Signer) Run(ctx context.Context) error {
	if s.Client == nil || s.Issuer == nil {
		return errors.New("podcert: Signer needs Client and Issuer")
	}
	s.defaults()
	gv := servedVersion(s.Client, "podcertificaterequests")
	if gv == "" {
		return fmt.Errorf("podcert: the API server serves no PodCertificateRequests (%s or %s): Kubernetes 1.35 or newer with the PodCertificateRequest feature gate, and on 1.35 and 1.36 --runtime-config=%s=true", apiV1, apiV1beta1, apiV1beta1)
	}
	factory := informers.NewSharedInformerFactory(s.Client, 0)
	requests := newRequestAPI(s.Client, factory, gv)
	s.status = requests.status
	queue := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[cache.ObjectName]())
	defer queue.ShutDown()
	enqueue := func(obj any) {
		pcr := asV1beta1(obj)
		if pcr != nil && pcr.Spec.SignerName == s.Name && !answered(pcr) {
			queue.Add(cache.MetaObjectToName(pcr))
		}
	}
	requests.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
	})
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), requests.informer.HasSynced) {
		return ctx.Err()
	}
	s.Log.Info("signing pod certificates", "signer", s.Name, "api", gv)
	done := make(chan struct{})
	for range s.Workers {
		go func() {
			defer func() { done <- struct{}{} }()
			for {
				key, shutdown := queue.Get()
				if shutdown {
					return
				}
				pcr, err := requests.get(key.Namespace, key.Name)
				if err == nil && !answered(pcr) {
					err = s.answer(ctx, pcr)
				}
				switch {
				case err == nil, apierrors.IsNotFound(err):
					queue.Forget(key)
				default:
					s.Log.Warn("pod certificate request not answered yet; retrying", "request", key.String(), "error", err)
					queue.AddRateLimited(key)
				}
				queue.Done(key)
			}
		}()
	}
	<-ctx.Done()
	queue.ShutDown()
	for range s.Workers {
		<-done
	}
	return nil
}

// answered says whether pcr has its final condition already.
func answered(pcr *certsv1beta1.PodCertificateRequest) bool {
	for _, c := range pcr.Status.Conditions {
		switch c.Type {
		case certsv1beta1.PodCertificateRequestConditionTypeIssued, certsv1beta1.PodCertificateRequestConditionTypeDenied, certsv1beta1.PodCertificateRequestConditionTypeFailed:
			return c.Status == metav1.ConditionTrue
		}
	}
	return false
}

// answer decides pcr and writes the decision; an error leaves it for a
// retry (the API server or the ledger unavailable, a rate limit).
func (s *Signer) answer(ctx context.Context, pcr *certsv1beta1.PodCertificateRequest) error {
	log := s.Log.With("request", pcr.Namespace+"/"+pcr.Name, "pod", pcr.Namespace+"/"+pcr.Spec.PodName, "node", string(pcr.Spec.NodeName))
	cert, err := s.decide(ctx, pcr)
	var r *refusal
	switch {
	case errors.As(err, &r):
		log.Warn("pod certificate request refused", "condition", r.condition, "reason", r.reason, "message", r.message)
		return s.setStatus(ctx, pcr, certsv1beta1.PodCertificateRequestStatus{Conditions: []metav1.Condition{s.condition(pcr, r.condition, r.reason, r.message)}})
	case err != nil:
		return err
	}
	notBefore, notAfter := cert.Leaf.NotBefore, cert.Leaf.NotAfter
	st := certsv1beta1.PodCertificateRequestStatus{
		Conditions:       []metav1.Condition{s.condition(pcr, certsv1beta1.PodCertificateRequestConditionTypeIssued, ReasonIssued, "issued "+cert.Leaf.URIs[0].String())},
		CertificateChain: strings.Join(cert.ChainPEM[:len(cert.ChainPEM)-1], ""),
		NotBefore:        ptr(metav1.NewTime(notBefore)),
		NotAfter:         ptr(metav1.NewTime(notAfter)),
		BeginRefreshAt:   ptr(metav1.NewTime(RefreshAt(notBefore, notAfter, s.RefreshFraction))),
	}
	if err := s.setStatus(ctx, pcr, st); err != nil {
		return err
	}
	log.Info("pod certificate request answered", "spiffe_id", cert.Leaf.URIs[0].String(), "not_after", notAfter.UTC(), "begin_refresh_at", st.BeginRefreshAt.UTC())
	return nil
}

// RefreshAt is when the kubelet is told to renew: fraction into the
// lifetime (0 or out of range: half, as meshid-agent does), within the 10
// minutes from either end that the API server requires.
func RefreshAt(notBefore, notAfter time.Time, fraction float64) time.Time {
	if fraction <= 0 || fraction >= 1 {
		fraction = 0.5
	}
	at := notBefore.Add(time.Duration(float64(notAfter.Sub(notBefore)) * fraction))
	if earliest := notBefore.Add(10 * time.Minute); at.Before(earliest) {
		at = earliest
	}
	if latest := notAfter.Add(-10 * time.Minute); at.After(latest) {
		at = latest
	}
	return at
}

func ptr[T any](v T) *T { return &v }

func (s *Signer) condition(pcr *certsv1beta1.PodCertificateRequest, typ, reason, message string) metav1.Condition {
	return metav1.Condition{
		Type: typ, Status: metav1.ConditionTrue, Reason: reason, Message: message,
		LastTransitionTime: metav1.NewTime(s.Now()), ObservedGeneration: pcr.Generation,
	}
}

func (s *Signer) setStatus(ctx context.Context, pcr *certsv1beta1.PodCertificateRequest, st certsv1beta1.PodCertificateRequestStatus) error {
	next := pcr.DeepCopy()
	next.Status = st
	if err := s.status(ctx, next); err != nil {
		return fmt.Errorf("podcert: writing the status of %s/%s: %w", pcr.Namespace, pcr.Name, err)
	}
	return nil
}

// decide checks pcr against the live pod, service account and node, and
// its key, then has it issued. A *refusal is final; other errors are
// retried.
func (s *Signer) decide(ctx context.Context, pcr *certsv1beta1.PodCertificateRequest) (*ca.Certificate, error) {
	spec := pcr.Spec
	// The objects are read live, not from a cache: the pod was created a
	// moment ago, and a UID seen here must be the one that exists now.
	pod, err := s.Client.CoreV1().Pods(pcr.Namespace).Get(ctx, spec.PodName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, deny(ReasonPodMismatch, "pod %s/%s does not exist", pcr.Namespace, spec.PodName)
	case err != nil:
		return nil, err
	case pod.UID != spec.PodUID:
		return nil, deny(ReasonPodMismatch, "pod %s/%s has UID %s, not the %s requested", pcr.Namespace, spec.PodName, pod.UID, spec.PodUID)
	case pod.Spec.ServiceAccountName != spec.ServiceAccountName:
		return nil, deny(ReasonPodMismatch, "pod %s/%s runs as service account %q, not %q", pcr.Namespace, spec.PodName, pod.Spec.ServiceAccountName, spec.ServiceAccountName)
	case pod.Spec.NodeName != string(spec.NodeName):
		return nil, deny(ReasonPodMismatch, "pod %s/%s is on node %q, not %q", pcr.Namespace, spec.PodName, pod.Spec.NodeName, spec.NodeName)
	case pod.DeletionTimestamp != nil:
		return nil, deny(ReasonPodMismatch, "pod %s/%s is being deleted", pcr.Namespace, spec.PodName)
	}
	sa, err := s.Client.CoreV1().ServiceAccounts(pcr.Namespace).Get(ctx, spec.ServiceAccountName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, deny(ReasonPodMismatch, "service account %s/%s does not exist", pcr.Namespace, spec.ServiceAccountName)
	case err != nil:
		return nil, err
	case sa.UID != spec.ServiceAccountUID:
		return nil, deny(ReasonPodMismatch, "service account %s/%s has UID %s, not the %s requested", pcr.Namespace, spec.ServiceAccountName, sa.UID, spec.ServiceAccountUID)
	}
	node, err := s.Client.CoreV1().Nodes().Get(ctx, string(spec.NodeName), metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, deny(ReasonPodMismatch, "node %s does not exist", spec.NodeName)
	case err != nil:
		return nil, err
	case node.UID != spec.NodeUID:
		return nil, deny(ReasonPodMismatch, "node %s has UID %s, not the %s requested", spec.NodeName, node.UID, spec.NodeUID)
	}
	if len(spec.UnverifiedUserAnnotations) > 0 {
		// The API asks signers to refuse what they do not understand, and
		// meshid reads none.
		return nil, deny(ReasonUserConfig, "meshid's signer takes no unverifiedUserAnnotations (%d given)", len(spec.UnverifiedUserAnnotations))
	}
	if len(spec.StubPKCS10Request) == 0 && len(spec.PKIXPublicKey) == 0 {
		// Read through v1, a request filed the v1beta1 way (a kubelet
		// older than the API server) shows no key: v1 has no field for it.
		if old, err := s.Client.CertificatesV1beta1().PodCertificateRequests(pcr.Namespace).Get(ctx, pcr.Name, metav1.GetOptions{}); err == nil && old.UID == pcr.UID {
			spec.PKIXPublicKey, spec.ProofOfPossession = old.Spec.PKIXPublicKey, old.Spec.ProofOfPossession
		}
	}
	var pub crypto.PublicKey
	if len(spec.StubPKCS10Request) > 0 {
		pub, err = CheckCSR(spec.StubPKCS10Request)
	} else {
		pub, err = CheckKey(spec.PKIXPublicKey, spec.ProofOfPossession, string(spec.PodUID))
	}
	if err != nil {
		return nil, err
	}
	ttl, err := s.ttl(spec.MaxExpirationSeconds)
	if err != nil {
		return nil, err
	}
	cert, err := s.Issuer.IssuePod(ctx, server.PodRequest{
		Namespace: pcr.Namespace, ServiceAccount: spec.ServiceAccountName, PodName: spec.PodName, PodUID: string(spec.PodUID),
		NodeName: string(spec.NodeName), PublicKey: pub, TTL: ttl,
	})
	switch {
	case errors.Is(err, server.ErrDenied):
		return nil, deny(ReasonIdentityDenied, "identity denied by an administrator (meshidctl deny)")
	case errors.Is(err, server.ErrRateLimited), errors.Is(err, server.ErrNotRecorded), errors.Is(err, ca.ErrNoIssuer):
		return nil, err // retried: the kubelet waits
	case err != nil:
		return nil, fail(ReasonSigningFailed, "meshid-ca could not sign the certificate (see its log)")
	}
	if lifetime := cert.Leaf.NotAfter.Sub(cert.Leaf.NotBefore); lifetime < MinLifetime {
		// The intermediate lapses sooner than the certificate would.
		return nil, fail(ReasonLifetime, "the certificate would live %v (the signing CA lapses sooner); the API requires at least %v", lifetime, MinLifetime)
	}
	return cert, nil
}

// ttl is what to ask the authority for: the request's maximum, or
// meshid's, whichever is shorter, less the backdating that the lifetime
// also counts.
func (s *Signer) ttl(maxSeconds *int32) (time.Duration, error) {
	limit := 24 * time.Hour // the API's default maxExpirationSeconds
	if maxSeconds != nil {
		limit = time.Duration(*maxSeconds) * time.Second
	}
	ttl := limit - s.Backdate
	if s.MaxTTL > 0 {
		ttl = min(ttl, s.MaxTTL)
	}
	if ttl+s.Backdate < MinLifetime {
		return 0, fail(ReasonLifetime, "meshid-ca's --max-cert-ttl (%v) is under the %v a pod certificate must live", s.MaxTTL, MinLifetime)
	}
	return ttl, nil
}

// CheckCSR reads the key of a request from a kubelet of Kubernetes 1.37
// or later: a stub PKCS #10 request, empty but for the key and signed by
// it. Its signature is checked again here (the API server checks it too),
// and the key must be one meshid issues to, as for CheckKey.
func CheckCSR(der []byte) (crypto.PublicKey, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, deny(ReasonUnsupportedKeyType, "the stub PKCS #10 request does not parse: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, deny(ReasonBadProof, "the stub PKCS #10 request's signature does not verify with its key: %v", err)
	}
	if err := checkKeyType(csr.PublicKey); err != nil {
		return nil, err
	}
	return csr.PublicKey, nil
}

func checkKeyType(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return deny(ReasonUnsupportedKeyType, "ECDSA on %s: meshid issues to ECDSAP256 and ECDSAP384 keys (and RSA3072, RSA4096)", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits != 3072 && bits != 4096 {
			return deny(ReasonUnsupportedKeyType, "RSA %d: meshid issues to RSA3072 and RSA4096 keys (and ECDSAP256, ECDSAP384)", bits)
		}
	case ed25519.PublicKey:
		return deny(ReasonUnsupportedKeyType, "Ed25519: meshid issues to ECDSAP256, ECDSAP384, RSA3072 and RSA4096 keys")
	default:
		return deny(ReasonUnsupportedKeyType, "%T keys are not supported; use ECDSAP256", pub)
	}
	return nil
}

// CheckKey parses a request's public key and verifies its proof of
// possession (the key's signature over the pod UID), as the API server
// does: the request of a kubelet before 1.37 (pkixPublicKey and
// proofOfPossession, deprecated since). meshid issues to P-256 and P-384 ECDSA keys and to 3072- and
// 4096-bit RSA keys; Ed25519 and P-521, which the API allows, are denied as
// UnsupportedKeyType (Envoy and Istio's proxies do not take them).
func CheckKey(pkix, proof []byte, podUID string) (crypto.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(pkix)
	if err != nil {
		return nil, deny(ReasonUnsupportedKeyType, "the public key does not parse: %v", err)
	}
	if err := checkKeyType(pub); err != nil {
		return nil, err
	}
	digest := sha256.Sum256([]byte(podUID))
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, digest[:], proof) {
			return nil, deny(ReasonBadProof, "the proof of possession does not verify with the request's key")
		}
	case *rsa.PublicKey:
		if rsa.VerifyPSS(k, crypto.SHA256, digest[:], proof, nil) != nil {
			return nil, deny(ReasonBadProof, "the proof of possession does not verify with the request's key")
		}
	}
	return pub, nil
}
