package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// issuedCount is the CA's count of certificates issued. It is read from
// /metrics, which the CA updates before it answers; its log reaches the
// test through a pipe, later.
func issuedCount(t *testing.T, p *caProcess) int { return requestsOK(t, p) }

// waitLogged waits for an issuance log line naming id.
func waitLogged(t *testing.T, p *caProcess, id string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Log(), `"spiffe_id":"`+id+`"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no issuance log line names %s", id)
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
}

// TestKubeTokenReview drives meshid-ca against a real kube-apiserver with
// tokens from TokenRequest, in TokenReview mode and in the default mode
// (offline checks, TokenReview when they cannot decide): both must make
// the same refusals, with the same codes.
func TestKubeTokenReview(t *testing.T) {
	for _, mode := range []string{"tokenreview", "kubernetes"} {
		t.Run(mode, func(t *testing.T) { testKubeTokenReview(t, mode) })
	}
}

func testKubeTokenReview(t *testing.T, mode string) {
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "shop", "web")
	cluster.ServiceAccount(t, "billing", "api")
	state := t.TempDir()
	p := startCA(t, "--auth="+mode, "--kubeconfig="+cluster.Kubeconfig,
		"--ca-source=dir", "--state-dir="+state,
		// Short enough that the deleted-account case below does not wait
		// long for meshid's own cache after the API server's.
		"--token-cache-ttl=1s")
	p.WaitReady(t, 30*time.Second)
	roots := readRoots(t, filepath.Join(state, "ca", keys.RootCertFile))
	client := p.Client(t, roots)
	ctx := context.Background()
	web := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")

	t.Run("issued", func(t *testing.T) {
		token := cluster.Token(t, "shop", "web", "istio-ca")
		chain, err := sign(ctx, client, web, token)
		if err != nil {
			t.Fatalf("CreateCertificate: %v", err)
		}
		if got, want := ca.Fingerprint(chain[len(chain)-1]), ca.Fingerprint(roots[0]); got != want {
			t.Errorf("last certificate of the chain is %s, want the root %s", got, want)
		}
		id, _, err := x509svid.Verify(chain[:len(chain)-1], x509bundle.FromX509Authorities(td, roots))
		if err != nil {
			t.Fatalf("x509svid.Verify: %v", err)
		}
		if id != web {
			t.Errorf("SPIFFE ID %s, want %s", id, web)
		}
		waitLogged(t, p, web.String())
	})

	refusals := []struct {
		name  string
		token func(t *testing.T) string
		id    spiffeid.ID
		code  codes.Code
	}{
		{"token for another audience", func(t *testing.T) string { return cluster.Token(t, "shop", "web", "vault") }, web, codes.Unauthenticated},
		{"default-audience token", func(t *testing.T) string { return cluster.Token(t, "shop", "web") }, web, codes.Unauthenticated},
		{"garbage token", func(t *testing.T) string { return "not.a.token" }, web, codes.Unauthenticated},
		{"namespace A token, CSR names namespace B", func(t *testing.T) string { return cluster.Token(t, "shop", "web", "istio-ca") }, spiffeid.RequireFromPath(td, "/ns/billing/sa/api"), codes.PermissionDenied},
		{"token of another service account", func(t *testing.T) string { return cluster.Token(t, "billing", "api", "istio-ca") }, web, codes.PermissionDenied},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			before := issuedCount(t, p)
			_, err := sign(ctx, client, tc.id, tc.token(t))
			if got := status.Code(err); got != tc.code {
				t.Fatalf("code %s (%v), want %s", got, err, tc.code)
			}
			if after := issuedCount(t, p); after != before {
				t.Errorf("%d certificates issued on a refused request", after-before)
			}
		})
	}

	t.Run("deleted service account", func(t *testing.T) {
		cluster.ServiceAccount(t, "shop", "gone")
		gone := spiffeid.RequireFromPath(td, "/ns/shop/sa/gone")
		token := cluster.Token(t, "shop", "gone", "istio-ca")
		if _, err := sign(ctx, client, gone, token); err != nil {
			t.Fatalf("before deletion: %v", err)
		}
		if err := cluster.Client.CoreV1().ServiceAccounts("shop").Delete(ctx, "gone", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// The API server keeps authenticating the token from its own cache
		// for about 10 s; then TokenReview must say no, and so must we.
		deadline := time.Now().Add(45 * time.Second)
		for {
			_, err := sign(ctx, client, gone, token)
			if status.Code(err) == codes.Unauthenticated {
				break
			}
			if err != nil && status.Code(err) != codes.Unauthenticated {
				t.Fatalf("code %s (%v), want OK until the API server notices, then Unauthenticated", status.Code(err), err)
			}
			if time.Now().After(deadline) {
				t.Fatal("a deleted service account's token still gets certificates after 45s")
			}
			time.Sleep(500 * time.Millisecond) // poll interval, not a wait for an event
		}
	})
}

// TestKubeAPIServerDown: with the API server gone, TokenReview cannot answer
// and meshid-ca must fail closed with Unavailable.
func TestKubeAPIServerDown(t *testing.T) {
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "shop", "web")
	state := t.TempDir()
	p := startCA(t, "--auth=tokenreview", "--kubeconfig="+cluster.Kubeconfig, "--ca-source=dir", "--state-dir="+state)
	p.WaitReady(t, 30*time.Second)
	client := p.Client(t, readRoots(t, filepath.Join(state, "ca", keys.RootCertFile)))
	web := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	// Tokens minted while the API server was up, never reviewed yet, so no
	// cache can answer for them.
	token := cluster.Token(t, "shop", "web", "istio-ca")
	cluster.KillAPIServer(t)
	before := issuedCount(t, p)
	_, err := sign(context.Background(), client, web, token)
	if got := status.Code(err); got != codes.Unavailable {
		t.Fatalf("code %s (%v), want Unavailable", got, err)
	}
	if after := issuedCount(t, p); after != before {
		t.Errorf("%d certificates issued with the API server down", after-before)
	}
	if !strings.Contains(p.Metrics(t), `meshid_ca_requests_total{code="Unavailable"} 1`) {
		t.Errorf("metrics do not count the Unavailable request")
	}
}

// TestKubeSecretReplicasConverge starts two CAs together on an empty cluster
// with their CA in a Secret: both must end with the same root.
func TestKubeSecretReplicasConverge(t *testing.T) {
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "meshid-system", "meshid-ca")
	cluster.ServiceAccount(t, "shop", "web")
	args := []string{"--auth=tokenreview", "--kubeconfig=" + cluster.Kubeconfig,
		"--ca-source=secret", "--namespace=meshid-system", "--secret-name=meshid-ca"}
	replicas := []*caProcess{launchCA(t, args...), launchCA(t, args...)}
	for _, p := range replicas {
		p.WaitServing(t)
	}
	var wg sync.WaitGroup
	for _, p := range replicas {
		wg.Go(func() { p.WaitReady(t, 60*time.Second) })
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(context.Background(), "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sec.Type != corev1.SecretTypeOpaque {
		t.Errorf("secret type %s", sec.Type)
	}
	roots, err := ca.ParseCertificatesPEM(sec.Data[keys.RootCertFile])
	if err != nil {
		t.Fatal(err)
	}
	want := ca.Fingerprint(roots[0])

	generated := 0
	token := cluster.Token(t, "shop", "web", "istio-ca")
	for i, p := range replicas {
		fp, msg := loadedRoot(t, p)
		if msg == "CA generated" {
			generated++
		}
		if fp != want {
			t.Errorf("replica %d loaded root %s, the Secret holds %s", i, fp, want)
		}
		chain, err := sign(context.Background(), p.Client(t, roots), spiffeid.RequireFromPath(td, "/ns/shop/sa/web"), token)
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
		if got := ca.Fingerprint(chain[len(chain)-1]); got != want {
			t.Errorf("replica %d signs under root %s, want %s", i, got, want)
		}
	}
	if generated != 1 {
		t.Errorf("%d replicas report having generated the CA, want exactly 1", generated)
	}
}

// loadedRoot returns the root fingerprint a CA process logged on loading its
// keys, and whether it generated or loaded them.
func loadedRoot(t *testing.T, p *caProcess) (fingerprint, msg string) {
	t.Helper()
	// Logged before the CA turns ready, but read through a pipe: poll.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		for _, msg := range []string{"CA generated", "CA loaded"} {
			if recs := p.LogRecords(msg); len(recs) > 0 {
				fp, _ := recs[0]["root_fingerprint"].(string)
				return fp, msg
			}
		}
	}
	t.Fatalf("no CA load line in the log:\n%s", p.Log())
	return "", ""
}
