package k8sauth

import (
	"context"
	"errors"
	"fmt"
	"slices"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	authnv1client "k8s.io/client-go/kubernetes/typed/authentication/v1"
)

// Keys of TokenReview's user extra that name the pod a token is bound to.
const (
	extraPodName = "authentication.kubernetes.io/pod-name"
	extraPodUID  = "authentication.kubernetes.io/pod-uid"
)

// TokenReview authenticates tokens by asking the Kubernetes API server.
type TokenReview struct {
	Client    authnv1client.TokenReviewsGetter
	Audiences []string // required, e.g. ["istio-ca"]
	Metrics   *Metrics // nil counts nothing
}

// Authenticate reviews token with our audiences set, and accepts it only
// when the API server says it is authenticated, for one of our audiences, as
// a service account. The review is never retried without audiences: that
// would accept tokens minted for the API server itself.
func (r *TokenReview) Authenticate(ctx context.Context, token string) (Caller, error) {
	if len(r.Audiences) == 0 {
		return Caller{}, fmt.Errorf("k8sauth: token review needs audiences")
	}
	if token == "" {
		return Caller{}, refused("no_token", "")
	}
	if len(token) > MaxTokenBytes {
		// Never sent: no projected token is this large.
		return Caller{}, refused("malformed", "token too large")
	}
	review, err := r.Client.TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: r.Audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		if ctx.Err() != nil {
			r.Metrics.reviewed("canceled")
		} else {
			r.Metrics.reviewed("error")
		}
		// Whatever the cause (network, 403 for a missing
		// system:auth-delegator binding, 5xx), fail closed.
		return Caller{}, unavailable(err)
	}
	c, err := callerFromReview(review.Status, r.Audiences)
	if err != nil {
		r.Metrics.reviewed("refused")
		var e *Error
		if errors.As(err, &e) {
			e.remote = true
		}
		return Caller{}, err
	}
	r.Metrics.reviewed("authenticated")
	c.Expiry = unverifiedExpiry(token)
	return c, nil
}

func callerFromReview(st authnv1.TokenReviewStatus, audiences []string) (Caller, error) {
	if !st.Authenticated {
		// st.Error comes from the API server and may be long; keep the
		// reason fixed and the detail short.
		return Caller{}, refused("rejected", truncate(st.Error, 200))
	}
	if !intersects(st.Audiences, audiences) {
		return Caller{}, refused("audience", "reviewed audiences do not include ours")
	}
	if !slices.Contains(st.User.Groups, "system:serviceaccounts") {
		return Caller{}, refused("not_service_account", "user is not in group system:serviceaccounts")
	}
	ns, sa, err := ParseUsername(st.User.Username)
	if err != nil {
		return Caller{}, err
	}
	c := Caller{Namespace: ns, ServiceAccount: sa, Method: MethodTokenReview}
	if v := st.User.Extra[extraPodName]; len(v) == 1 {
		c.PodName = v[0]
	}
	if v := st.User.Extra[extraPodUID]; len(v) == 1 {
		c.PodUID = v[0]
	}
	return c, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
