package e2e

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/internal/kubetest"
)

// TestAgentNodeModeKube: proxies' tokens from TokenRequest, checked by the
// node agent and by the CA with TokenReview against a real kube-apiserver;
// each SDS stream gets the identity of its own token.
func TestAgentNodeModeKube(t *testing.T) {
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "shop", "web")
	cluster.ServiceAccount(t, "billing", "api")
	state := t.TempDir()
	p := startCA(t, "--auth=tokenreview", "--kubeconfig="+cluster.Kubeconfig, "--ca-source=dir", "--state-dir="+state)
	p.WaitReady(t, 30*time.Second)

	socket := shortSocket(t)
	startAgent(t, "--mode=node", "--auth=tokenreview", "--kubeconfig="+cluster.Kubeconfig,
		"--ca-addr="+p.GRPCAddr, "--ca-server-name=localhost",
		"--ca-root-file="+filepath.Join(state, "ca", "root-cert.pem"), "--sds-socket="+socket)
	client := sdsClient(t, socket)

	fetch := func(token string) (string, error) {
		deadline := time.Now().Add(20 * time.Second)
		for {
			id, err := firstSecret(context.Background(), client, token)
			if status.Code(err) == codes.Unavailable && time.Now().Before(deadline) {
				time.Sleep(100 * time.Millisecond) // retry interval: the agent is still starting
				continue
			}
			return id, err
		}
	}
	for _, tc := range []struct{ ns, sa string }{{"shop", "web"}, {"billing", "api"}} {
		got, err := fetch(cluster.Token(t, tc.ns, tc.sa, "istio-ca"))
		if err != nil {
			t.Fatalf("%s/%s: %v", tc.ns, tc.sa, err)
		}
		if want := "spiffe://cluster.local/ns/" + tc.ns + "/sa/" + tc.sa; got != want {
			t.Errorf("stream with %s/%s's token got %s", tc.ns, tc.sa, got)
		}
	}
	for name, token := range map[string]string{
		"default-audience token": cluster.Token(t, "shop", "web"),
		"garbage token":          "not.a.token",
	} {
		if _, err := fetch(token); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: %v, want Unauthenticated", name, err)
		}
	}
}
