package e2e

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca/keys"
)

// TestKubeOffline drives meshid-ca in its default mode (--auth=kubernetes)
// against a real kube-apiserver, as deploy/base's RBAC lets it: tokens of
// live pods are accepted without a TokenReview, everything a review would
// refuse is still refused, and without the API server it fails closed.
func TestKubeOffline(t *testing.T) {
	e := newStormEnv(t)
	pods := e.createPods(t, "web", 2, 1)
	state := t.TempDir()
	p := startCA(t, append(e.caArgs("kubernetes", state), "--token-cache-ttl=1s")...)
	p.WaitReady(t, 60*time.Second)
	waitMetric(t, p, "meshid_ca_token_offline_ready", 1)
	client := p.Client(t, readRoots(t, filepath.Join(state, "ca", keys.RootCertFile)))
	ctx := context.Background()
	web := pods[0].id

	// reviews runs f and returns the TokenReviews the API server served
	// meanwhile, by its own count.
	reviews := func(f func()) int {
		before := e.tokenReviews(t)
		f()
		return int(e.tokenReviews(t) - before)
	}
	token := func(p stormPod, audience string) string {
		tok, err := e.podToken(p, audience)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}

	t.Run("live pod: issued without a review", func(t *testing.T) {
		n := reviews(func() {
			if _, err := sign(ctx, client, web, token(pods[0], "istio-ca")); err != nil {
				t.Fatal(err)
			}
		})
		if n != 0 {
			t.Errorf("%d TokenReviews, want 0", n)
		}
		if !strings.Contains(p.Log(), `"auth":"offline"`) {
			t.Error("the issuance log does not say the token was checked offline")
		}
	})

	valid := token(pods[0], "istio-ca")
	for _, tc := range []struct{ name, token string }{
		{"another audience", token(pods[0], "vault")},
		{"expired", e.expired(t, valid)},
		{"forged signature", forgedSignature(valid, 1)},
		{"garbage", "not.a.token"},
	} {
		t.Run(tc.name+": refused without a review", func(t *testing.T) {
			n := reviews(func() {
				before := issuedCount(t, p)
				_, err := sign(ctx, client, web, tc.token)
				if status.Code(err) != codes.Unauthenticated {
					t.Fatalf("code %s (%v), want Unauthenticated", status.Code(err), err)
				}
				if issuedCount(t, p) != before {
					t.Error("issued on a refused token")
				}
			})
			if n != 0 {
				t.Errorf("%d TokenReviews, want 0", n)
			}
		})
	}

	t.Run("deleted pod, then recreated under its name", func(t *testing.T) {
		old := token(pods[1], "istio-ca")
		if _, err := sign(ctx, client, web, old); err != nil {
			t.Fatalf("before deletion: %v", err)
		}
		// A pod on no node is removed at once, without a grace period.
		if err := e.kube.CoreV1().Pods(stormNamespace).Delete(ctx, pods[1].name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitRefused(t, client, web, old, 30*time.Second)
		again := e.createPods(t, "web", 2, 1)[1]
		if again.uid == pods[1].uid {
			t.Fatal("the recreated pod kept its UID")
		}
		if _, err := sign(ctx, client, web, old); status.Code(err) != codes.Unauthenticated {
			t.Errorf("the deleted pod's token, after a pod of its name came back: %v, want Unauthenticated", err)
		}
		if _, err := sign(ctx, client, web, token(again, "istio-ca")); err != nil {
			t.Errorf("the new pod's token: %v", err)
		}
	})

	t.Run("deleted service account", func(t *testing.T) {
		e.cluster.ServiceAccount(t, stormNamespace, "gone")
		pod := e.createPod(t, "gone-0", "gone")
		tok := token(pod, "istio-ca")
		if _, err := sign(ctx, client, pod.id, tok); err != nil {
			t.Fatal(err)
		}
		if err := e.kube.CoreV1().ServiceAccounts(stormNamespace).Delete(ctx, "gone", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitRefused(t, client, pod.id, tok, 30*time.Second)
	})

	t.Run("API server gone: fails closed", func(t *testing.T) {
		fresh := e.createPod(t, "late-0", "sa-0")
		tok := token(fresh, "istio-ca") // never checked yet
		stopped := time.Now()
		e.cluster.KillAPIServer(t)
		// The CA notices a broken watch at once and a silent API server
		// within its probe window (3 s); allow a loaded machine more.
		waitMetric(t, p, "meshid_ca_token_offline_ready", 0)
		t.Logf("offline checks stopped %s after the API server", time.Since(stopped).Round(time.Millisecond))
		before := issuedCount(t, p)
		_, err := sign(ctx, client, web, tok)
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("code %s (%v), want Unavailable", status.Code(err), err)
		}
		if issuedCount(t, p) != before {
			t.Error("issued with the API server gone")
		}
	})
}

// waitRefused signs with token until the CA refuses it (Unauthenticated);
// any other error, or still issuing after within, fails t.
func waitRefused(t *testing.T, client *agent.CAClient, id spiffeid.ID, token string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		_, err := sign(context.Background(), client, id, token)
		switch status.Code(err) {
		case codes.Unauthenticated:
			return
		case codes.OK:
		default:
			t.Fatalf("code %s (%v), want OK until the CA notices, then Unauthenticated", status.Code(err), err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("still issued after %s", within)
		}
		time.Sleep(200 * time.Millisecond) // poll interval, not a wait for an event
	}
}

// waitMetric waits until the CA's metric (a series without labels) reads
// want, for up to 30 s.
func waitMetric(t *testing.T, p *caProcess, name string, want float64) {
	t.Helper()
	waitUntil(t, 30*time.Second, name+" to be "+strconv.FormatFloat(want, 'g', -1, 64), func() bool {
		return sumMetric(p.Metrics(t), name) == want
	})
}
