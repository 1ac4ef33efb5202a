package k8sauth

import (
	"encoding/json"
	"errors"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// APIServerLeeway is the clock skew the API server allows on a
// service-account token's exp, nbf and iat (go-jose's DefaultLeeway, which
// k8s.io/kubernetes pkg/serviceaccount uses), and how long after its
// deletionTimestamp it still honours a token bound to a service account or
// pod. Checks meant to refuse only what a TokenReview would refuse use it.
const APIServerLeeway = time.Minute

// claims are the parts of a Kubernetes projected token we read.
type claims struct {
	jwt.Claims
	Kubernetes *struct {
		Namespace      string `json:"namespace"`
		ServiceAccount struct {
			Name string `json:"name"`
			UID  string `json:"uid"`
		} `json:"serviceaccount"`
		Pod    *objectRef `json:"pod"`
		Secret *objectRef `json:"secret"`
		Node   *objectRef `json:"node"`
	} `json:"kubernetes.io"`
}

type objectRef struct {
	Name string `json:"name"`
	UID  string `json:"uid"`
}

// token is a parsed projected service-account token whose signature has not
// been checked yet: nothing in it is to be believed, only refused.
type token struct {
	jws    *jose.JSONWebSignature
	kid    string
	claims claims
	ns, sa string
}

// parseToken reads raw as a compact JWS with one signature by an algorithm
// Kubernetes signs with, and its claims as a projected token's. It refuses
// what can never be a valid token; it verifies nothing.
func parseToken(raw string) (*token, error) {
	if raw == "" {
		return nil, refused("no_token", "")
	}
	if len(raw) > MaxTokenBytes {
		return nil, refused("malformed", "token too large")
	}
	jws, err := jose.ParseSignedCompact(raw, signatureAlgorithms)
	if err != nil {
		return nil, refused("malformed", "not a signed JWT")
	}
	if len(jws.Signatures) != 1 {
		return nil, refused("malformed", "want exactly one signature")
	}
	t := &token{jws: jws, kid: jws.Signatures[0].Header.KeyID}
	if err := json.Unmarshal(jws.UnsafePayloadWithoutVerification(), &t.claims); err != nil {
		return nil, refused("malformed", "claims are not a JSON object of JWT claims")
	}
	return t, nil
}

// check refuses a token by its claims alone, the way the API server would:
// expiry and validity with leeway, an audience among ours, the issuer when
// issuer is known, and a subject that names a service account its
// kubernetes.io claims agree with. Legacy secret-based tokens carry no
// audience and are refused here, as a TokenReview with our audiences
// refuses them.
func (t *token) check(audiences []string, issuer string, now time.Time, leeway time.Duration) error {
	c := &t.claims
	if c.Expiry == nil {
		return refused("expired", "token has no expiry")
	}
	expected := jwt.Expected{AnyAudience: jwt.Audience(audiences), Time: now}
	if issuer != "" {
		expected.Issuer = issuer
	}
	err := c.Claims.ValidateWithLeeway(expected, leeway)
	switch {
	case errors.Is(err, jwt.ErrInvalidIssuer):
		return refused("issuer", "token issuer is not the cluster's")
	case errors.Is(err, jwt.ErrInvalidAudience):
		return refused("audience", "token audiences do not include ours")
	case errors.Is(err, jwt.ErrExpired):
		return refused("expired", "token expired")
	case errors.Is(err, jwt.ErrNotValidYet), errors.Is(err, jwt.ErrIssuedInTheFuture):
		return refused("not_yet_valid", "token not valid yet")
	case err != nil:
		return refused("claims", "invalid claims")
	}
	ns, sa, err := ParseUsername(c.Subject)
	if err != nil {
		return err
	}
	k := c.Kubernetes
	if k == nil {
		return refused("not_service_account", "not a bound service account token (no kubernetes.io claims)")
	}
	if k.Namespace != ns || k.ServiceAccount.Name != sa {
		return refused("claims", "kubernetes.io claims disagree with the subject")
	}
	t.ns, t.sa = ns, sa
	return nil
}

// verify checks the signature against keys (those with the token's key ID).
// It says false when none verifies; the claims were read already.
func (t *token) verify(keys []jose.JSONWebKey) bool {
	for _, k := range keys {
		if _, err := t.jws.Verify(k.Key); err == nil {
			return true
		}
	}
	return false
}

// caller is the identity the token names, once it is proven.
func (t *token) caller(m Method) Caller {
	c := Caller{Namespace: t.ns, ServiceAccount: t.sa, Method: m}
	if t.claims.Expiry != nil {
		c.Expiry = t.claims.Expiry.Time()
	}
	if p := t.claims.Kubernetes.Pod; p != nil {
		c.PodName, c.PodUID = p.Name, p.UID
	}
	return c
}

// boundTo says what the token is bound to: "pod", "secret", "node", or ""
// for a token bound to its service account alone.
func (t *token) boundTo() string {
	k := t.claims.Kubernetes
	switch {
	case k.Pod != nil:
		return "pod"
	case k.Secret != nil:
		return "secret"
	case k.Node != nil:
		return "node"
	}
	return ""
}
