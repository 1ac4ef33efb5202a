package k8sauth_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/internal/satoken"
)

// objects is an ObjectSource holding what a test says the watches saw.
type objects struct {
	pods, sas map[string]k8sauth.Object
	stale     bool
}

func (o *objects) Pod(ns, name string) (k8sauth.Object, bool) {
	p, ok := o.pods[ns+"/"+name]
	return p, ok
}

func (o *objects) ServiceAccount(ns, name string) (k8sauth.Object, bool) {
	s, ok := o.sas[ns+"/"+name]
	return s, ok
}

func (o *objects) Fresh() bool { return !o.stale }

const saUID = "sa-uid-1"

// kubernetesAuth is the offline path against is's keys and objs, with a
// review that counts its calls and accepts.
func kubernetesAuth(t *testing.T, is *satoken.Issuer, objs k8sauth.ObjectSource, now time.Time) (*k8sauth.Kubernetes, *countingAuth) {
	t.Helper()
	ks := issuerKeys(t, is)
	review := &countingAuth{caller: k8sauth.Caller{Namespace: "demo", ServiceAccount: "web", Method: k8sauth.MethodTokenReview}}
	return &k8sauth.Kubernetes{
		Audiences: []string{"istio-ca"},
		Issuer:    func() string { return is.URL },
		Keys:      ks,
		Objects:   objs,
		Review:    review,
		Now:       func() time.Time { return now },
	}, review
}

func TestKubernetes(t *testing.T) {
	is := newIssuer(t)
	other := newIssuer(t)
	foreign, err := satoken.New("https://other-issuer.test")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Truncate(time.Second)
	live := func() *objects {
		return &objects{
			sas:  map[string]k8sauth.Object{"demo/web": {UID: saUID}},
			pods: map[string]k8sauth.Object{"demo/web-1": {UID: "pod-uid-1"}},
		}
	}
	base := satoken.Claims{Namespace: "demo", ServiceAccount: "web", ServiceAccountUID: saUID, PodName: "web-1", PodUID: "pod-uid-1", Audiences: []string{"istio-ca"}, Now: now}
	mint := func(is *satoken.Issuer, edit func(*satoken.Claims)) string { return mintToken(t, is, base, edit) }
	good := mint(is, nil)
	parts := strings.Split(good, ".")

	for _, tc := range []struct {
		name    string
		token   string
		objects func(*objects)
		// want: "" accepted offline, "review" sent to the review, else
		// refused here for that reason.
		want string
	}{
		{name: "accepted offline", token: good},
		{name: "bound to no pod: its service account is enough", token: mint(is, func(c *satoken.Claims) { c.PodName, c.PodUID = "", "" })},
		{name: "expired, within the API server's leeway", token: mint(is, func(c *satoken.Claims) { c.Now = now.Add(-60*time.Minute - 30*time.Second) })},
		{name: "pod deleting, within the API server's leeway", token: good,
			objects: func(o *objects) {
				o.pods["demo/web-1"] = k8sauth.Object{UID: "pod-uid-1", Deleted: now.Add(-30 * time.Second)}
			}},

		{name: "garbage", token: "garbage", want: "malformed"},
		{name: "expired beyond the leeway", token: mint(is, func(c *satoken.Claims) { c.Now = now.Add(-62 * time.Minute) }), want: "expired"},
		{name: "another audience", token: mint(is, func(c *satoken.Claims) { c.Audiences = []string{"vault"} }), want: "audience"},
		{name: "known key, bad signature", token: parts[0] + "." + editPayload(t, parts[1], "web-1", "web-2") + "." + parts[2], want: "signature"},
		{name: "pod deleted longer ago than the leeway", token: good,
			objects: func(o *objects) {
				o.pods["demo/web-1"] = k8sauth.Object{UID: "pod-uid-1", Deleted: now.Add(-61 * time.Second)}
			}, want: "deleted"},
		{name: "service account deleted", token: good,
			objects: func(o *objects) { o.sas["demo/web"] = k8sauth.Object{UID: saUID, Deleted: now.Add(-2 * time.Minute)} }, want: "deleted"},

		{name: "unknown key", token: mint(other, nil), want: "review"},
		{name: "another issuer", token: mint(foreign, nil), want: "review"},
		{name: "pod not seen", token: good, objects: func(o *objects) { delete(o.pods, "demo/web-1") }, want: "review"},
		{name: "pod recreated (another UID)", token: good, objects: func(o *objects) { o.pods["demo/web-1"] = k8sauth.Object{UID: "pod-uid-2"} }, want: "review"},
		{name: "service account recreated", token: good, objects: func(o *objects) { o.sas["demo/web"] = k8sauth.Object{UID: "sa-uid-2"} }, want: "review"},
		{name: "service account not seen", token: good, objects: func(o *objects) { delete(o.sas, "demo/web") }, want: "review"},
		{name: "bound to a secret", token: mint(is, func(c *satoken.Claims) { c.PodName, c.PodUID, c.SecretName, c.SecretUID = "", "", "s", "s-uid" }), want: "review"},
		{name: "watches not fresh", token: good, objects: func(o *objects) { o.stale = true }, want: "review"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := live()
			if tc.objects != nil {
				tc.objects(objs)
			}
			auth, review := kubernetesAuth(t, is, objs, now)
			c, err := auth.Authenticate(context.Background(), tc.token)
			switch tc.want {
			case "":
				if err != nil {
					t.Fatal(err)
				}
				if c.Method != k8sauth.MethodOffline || c.Namespace != "demo" || c.ServiceAccount != "web" {
					t.Errorf("caller %+v, want demo/web authenticated offline", c)
				}
				if review.calls.Load() != 0 {
					t.Error("reviewed a token decided offline")
				}
			case "review":
				if review.calls.Load() != 1 {
					t.Fatalf("%d reviews, want the token sent to one (err %v)", review.calls.Load(), err)
				}
			default:
				if got := k8sauth.Reason(err); got != tc.want || !errors.Is(err, k8sauth.ErrUnauthenticated) {
					t.Errorf("err = %v (reason %q), want reason %q", err, got, tc.want)
				}
				if review.calls.Load() != 0 {
					t.Error("reviewed a token refused locally")
				}
			}
		})
	}

	t.Run("pod-bound caller", func(t *testing.T) {
		auth, _ := kubernetesAuth(t, is, live(), now)
		c, err := auth.Authenticate(context.Background(), good)
		if err != nil {
			t.Fatal(err)
		}
		want := k8sauth.Caller{Namespace: "demo", ServiceAccount: "web", PodName: "web-1", PodUID: "pod-uid-1", Expiry: now.Add(time.Hour), Method: k8sauth.MethodOffline}
		if c != want {
			t.Errorf("caller %+v, want %+v", c, want)
		}
	})
	t.Run("no keys or objects: every plausible token is reviewed", func(t *testing.T) {
		auth, review := kubernetesAuth(t, is, live(), now)
		auth.Keys, auth.Objects = nil, nil
		auth.Authenticate(context.Background(), good)
		auth.Authenticate(context.Background(), mint(other, nil))
		if review.calls.Load() != 2 {
			t.Errorf("%d reviews, want 2", review.calls.Load())
		}
		if _, err := auth.Authenticate(context.Background(), "garbage"); k8sauth.Reason(err) != "malformed" {
			t.Errorf("garbage: %v, want refused here", err)
		}
	})
}

// FuzzKubernetes: no input panics, and none is accepted offline unless it is
// the token the issuer signed.
func FuzzKubernetes(f *testing.F) {
	is := newIssuer(f)
	now := time.Now()
	good, _ := is.Token(satoken.Claims{Namespace: "demo", ServiceAccount: "web", ServiceAccountUID: saUID, Audiences: []string{"istio-ca"}, Now: now})
	f.Add(good)
	f.Add("a.b.c")
	f.Add("eyJhbGciOiJFUzI1NiJ9.e30.AAAA")
	path := filepath.Join(f.TempDir(), "jwks.json")
	if err := os.WriteFile(path, is.JWKS(), 0o644); err != nil {
		f.Fatal(err)
	}
	ks := k8sauth.NewFileKeySet(path)
	f.Fuzz(func(t *testing.T, token string) {
		auth := &k8sauth.Kubernetes{
			Audiences: []string{"istio-ca"}, Issuer: func() string { return is.URL }, Keys: ks,
			Objects: &objects{sas: map[string]k8sauth.Object{"demo/web": {UID: saUID}}},
			Review:  &countingAuth{err: errors.New("reviewed")},
			Now:     func() time.Time { return now },
		}
		c, err := auth.Authenticate(context.Background(), token)
		if err == nil && (token != good || c.Method != k8sauth.MethodOffline) {
			t.Fatalf("accepted %q as %+v", token, c)
		}
	})
}
