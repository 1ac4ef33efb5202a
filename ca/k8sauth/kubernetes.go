package k8sauth

import (
	"context"
	"time"
)

// MethodOffline marks a caller authenticated without a TokenReview: its
// token verified against the cluster's own keys, its service account and pod
// found, live, in the watched objects.
const MethodOffline Method = "offline"

// Kubernetes authenticates the projected service-account tokens of the
// cluster it talks to at the least cost to the API server, never accepting
// what a TokenReview would refuse:
//
//  1. What the claims alone condemn is refused locally: not a JWT, too
//     large, expired or not yet valid (with the API server's leeway), for
//     none of our audiences, a subject that is no service account.
//  2. With the cluster's keys (Keys), a token that names a known key but is
//     not signed by it is refused locally.
//  3. With the cluster's objects (Objects) fresh, a verified token of the
//     cluster's issuer is accepted when its service account, and the pod it
//     is bound to, exist with the UIDs it names; it is refused when either
//     was deleted longer than [APIServerLeeway] ago (the API server's rule).
//  4. Everything else goes to Review (a TokenReview): a key or issuer not
//     known here, a token bound to a Secret or a Node, an object not seen
//     (yet) or with another UID, and every token while Objects is not fresh
//     (so a CA that lost the API server fails closed as Review does).
//
// With Objects nil every token that passes 1 and 2 is reviewed.
type Kubernetes struct {
	Audiences []string
	Issuer    func() string // the cluster's issuer; "" while unknown
	Keys      KeySource     // nil: no signature check here
	Objects   ObjectSource  // nil: no offline acceptance
	Review    Authenticator
	Metrics   *Metrics
	Now       func() time.Time // nil means time.Now
}

// Authenticate checks token as above.
func (k *Kubernetes) Authenticate(ctx context.Context, raw string) (Caller, error) {
	c, decided, err := k.decide(ctx, raw)
	if decided {
		k.Metrics.decidedLocally(err)
		return c, err
	}
	return k.Review.Authenticate(ctx, raw)
}

// decide is steps 1 to 3; decided false sends the token to a review.
func (k *Kubernetes) decide(ctx context.Context, raw string) (c Caller, decided bool, err error) {
	t, err := parseToken(raw)
	if err != nil {
		return Caller{}, true, err
	}
	now := time.Now()
	if k.Now != nil {
		now = k.Now()
	}
	// The issuer is not checked here: the API server may accept more than
	// the one it publishes, and a token of another goes to the review.
	if err := t.check(k.Audiences, "", now, APIServerLeeway); err != nil {
		return Caller{}, true, err
	}
	issuer := ""
	if k.Issuer != nil {
		issuer = k.Issuer()
	}
	if k.Keys == nil || issuer == "" || t.claims.Issuer != issuer {
		return Caller{}, false, nil
	}
	keys, err := k.Keys.Keys(ctx, t.kid)
	if err != nil || len(keys) == 0 {
		return Caller{}, false, nil // a key the API server may have and we do not see
	}
	if !t.verify(keys) {
		return Caller{}, true, refused("signature", "no key of the cluster verifies the token")
	}
	if k.Objects == nil || !k.Objects.Fresh() {
		return Caller{}, false, nil
	}
	kc := t.claims.Kubernetes
	sa, ok := k.Objects.ServiceAccount(t.ns, t.sa)
	if decided, err := live(sa, ok, kc.ServiceAccount.UID, "service account", now); !decided || err != nil {
		return Caller{}, decided, err
	}
	switch t.boundTo() {
	case "":
	case "pod":
		pod, ok := k.Objects.Pod(t.ns, kc.Pod.Name)
		if decided, err := live(pod, ok, kc.Pod.UID, "pod", now); !decided || err != nil {
			return Caller{}, decided, err
		}
	default:
		return Caller{}, false, nil // bound to a Secret or a Node: not watched here
	}
	return t.caller(MethodOffline), true, nil
}

// live judges the object a token is bound to, as the API server does: it
// must exist with the UID the token names, and not have been deleted longer
// than APIServerLeeway ago. Not seen, or seen with another UID (recreated,
// or a watch behind), is for the API server to tell.
func live(obj Object, found bool, uid, what string, now time.Time) (decided bool, err error) {
	switch {
	case !found || obj.UID != uid:
		return false, nil
	case !obj.Deleted.IsZero() && obj.Deleted.Before(now.Add(-APIServerLeeway)):
		return true, refused("deleted", "the token's "+what+" has been deleted")
	}
	return true, nil
}
