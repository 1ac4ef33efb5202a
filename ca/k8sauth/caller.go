package k8sauth

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Authenticator turns a bearer token into a caller.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Caller, error)
}

// Method says how a caller was authenticated.
type Method string

// Authentication methods.
const (
	MethodTokenReview Method = "tokenreview"
	MethodJWKS        Method = "jwks"
)

// Caller is an authenticated Kubernetes service account.
type Caller struct {
	Namespace      string
	ServiceAccount string
	PodName        string    // empty when the token is not bound to a pod
	PodUID         string    // likewise
	Expiry         time.Time // when the token stops being valid; zero if unknown
	Method         Method
	// Cluster is the ID of the cluster whose API server (or keys) verified
	// the token, when the authenticator knows several (multicluster); ""
	// otherwise.
	Cluster string
}

// ID is the caller's SPIFFE ID in trust domain td.
func (c Caller) ID(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	return spiffeid.FromSegments(td, "ns", c.Namespace, "sa", c.ServiceAccount)
}

// ErrUnauthenticated matches every refusal of a token.
var ErrUnauthenticated = errors.New("k8sauth: token refused")

// ErrUnavailable matches failures to reach whatever judges tokens; no caller
// is authenticated while it lasts.
var ErrUnavailable = errors.New("k8sauth: token reviewer unavailable")

// Error is an authentication failure. Reason is a short fixed label (for
// metrics and logs); Detail never contains the token.
type Error struct {
	Reason      string
	Detail      string
	Err         error
	unavailable bool
	remote      bool // the API server refused the token
}

func (e *Error) Error() string {
	msg := "k8sauth: " + e.Reason
	if e.Detail != "" {
		msg += ": " + e.Detail
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrUnavailable) and errors.Is(err,
// ErrUnauthenticated) tell the two kinds apart.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrUnavailable:
		return e.unavailable
	case ErrUnauthenticated:
		return !e.unavailable
	}
	return false
}

func refused(reason, detail string) error {
	return &Error{Reason: reason, Detail: detail}
}

// Unavailable marks err as a failure to judge tokens (errors.Is
// ErrUnavailable), for authenticators outside this package.
func Unavailable(err error) error { return unavailable(err) }

func unavailable(err error) error {
	return &Error{Reason: "unavailable", Err: err, unavailable: true}
}

// Reason returns the label of an authentication error, "unknown" for others.
func Reason(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return "unknown"
}

const saUserPrefix = "system:serviceaccount:"

// ParseUsername splits system:serviceaccount:<namespace>:<name>, strictly:
// exactly four parts, a valid namespace and a valid service account name.
func ParseUsername(username string) (namespace, name string, err error) {
	rest, ok := strings.CutPrefix(username, saUserPrefix)
	if !ok {
		return "", "", refused("not_service_account", "username is not a service account")
	}
	parts := strings.Split(rest, ":")
	if len(parts) != 2 {
		return "", "", refused("not_service_account", "malformed service account username")
	}
	namespace, name = parts[0], parts[1]
	if len(validation.IsDNS1123Label(namespace)) != 0 {
		return "", "", refused("not_service_account", "invalid namespace in username")
	}
	if len(validation.IsDNS1123Subdomain(name)) != 0 {
		return "", "", refused("not_service_account", "invalid service account name in username")
	}
	return namespace, name, nil
}

func intersects(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

// unverifiedExpiry reads the exp claim of a JWT without checking anything.
// It is only used, after the API server accepted the token, to keep a cache
// entry from outliving the token.
func unverifiedExpiry(token string) time.Time {
	first := strings.IndexByte(token, '.')
	if first < 0 {
		return time.Time{}
	}
	payload := token[first+1:]
	second := strings.IndexByte(payload, '.')
	if second < 0 {
		return time.Time{}
	}
	payload = payload[:second]
	if len(payload) > 16<<10 {
		return time.Time{}
	}
	raw, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		return time.Time{}
	}
	var claims struct {
		Exp *json.Number `json:"exp"`
	}
	if err := json.Unmarshal(raw, &claims); err != nil || claims.Exp == nil {
		return time.Time{}
	}
	exp, err := claims.Exp.Int64()
	if err != nil || exp <= 0 {
		return time.Time{}
	}
	return time.Unix(exp, 0)
}
