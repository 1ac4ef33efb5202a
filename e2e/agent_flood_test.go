package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/sds"
)

// sdsFloodEnv names the socket and a file of bad tokens ("socket,file") the
// e2e test binary, started again as a child, floods instead of running
// tests: one local process sending tokens that must be refused, as fast as
// the agent answers.
const sdsFloodEnv = "MESHID_E2E_SDS_FLOOD"

// floodSDS opens SDS streams on socket, floodStreams at a time, until it is
// killed, each with a bad token: one from file, junk, or the first token of
// file (a valid one, never sent as is) with its signature forged.
func floodSDS(socket, file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	lines := strings.Fields(string(b))
	if len(lines) < 2 {
		return fmt.Errorf("%s: want a token to forge and bad tokens", file)
	}
	template, tokens := lines[0], lines[1:]
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	client := secretv3.NewSecretDiscoveryServiceClient(conn)
	var sent atomic.Int64
	// At full speed: floodWarm tokens sent, or two seconds of sending
	// (an agent that makes each bad token wait is flooded all the same).
	var warmOnce sync.Once
	warm := func() { warmOnce.Do(func() { fmt.Fprintln(os.Stderr, floodWarmLine) }) }
	time.AfterFunc(2*time.Second, warm)
	var wg sync.WaitGroup
	for w := range floodStreams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; ; i += floodStreams {
				firstSecret(context.Background(), client, badToken(i, tokens, template))
				if sent.Add(1) == floodWarm {
					warm()
				}
			}
		}()
	}
	wg.Wait()
	return nil
}

// A flood process prints floodWarmLine once it has sent floodWarm tokens,
// or after two seconds.
const (
	floodWarm     = 500
	floodWarmLine = "flood: at full speed"
)

// firstSecret opens an SDS stream as Envoy does with token and returns the
// SPIFFE ID of the first certificate sent.
func firstSecret(ctx context.Context, client secretv3.SecretDiscoveryServiceClient, token string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	stream, err := client.StreamSecrets(ctx)
	if err != nil {
		return "", err
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType}); err != nil {
		return "", err
	}
	resp, err := stream.Recv()
	if err != nil {
		return "", err
	}
	var sec tlsv3.Secret
	if err := resp.Resources[0].UnmarshalTo(&sec); err != nil {
		return "", err
	}
	certs, err := ca.ParseCertificatesPEM(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if err != nil {
		return "", err
	}
	return certs[0].URIs[0].String(), nil
}

// TestAgentNodeFlood: meshid-agent in node mode, checking tokens with the
// API server as deploy/base sets it up, while four other local processes
// flood its socket with tokens that must be refused. Every proxy's stream
// still gets its first certificate, about as fast as without the flood,
// and the flood costs the API server no TokenReview.
func TestAgentNodeFlood(t *testing.T) {
	e := newStormEnv(t)
	e.cluster.ServiceAccount(t, "meshid-node", "meshid-agent")
	a := newApplier(t, e.cluster)
	for _, obj := range yamlObjects(t, "../deploy/base/agent-rbac.yaml") {
		a.apply(t, obj)
	}
	agentKubeconfig := e.cluster.KubeconfigFor(t, "meshid-node", "meshid-agent")
	state := t.TempDir()
	p := startCA(t, e.caArgs("kubernetes", state)...)
	p.WaitReady(t, 60*time.Second)
	socket := shortSocket(t)
	ag := startAgent(t, "--mode=node", "--auth=tokenreview", "--kubeconfig="+agentKubeconfig,
		"--ca-addr="+p.GRPCAddr, "--ca-server-name=localhost",
		"--ca-root-file="+filepath.Join(state, "ca", "root-cert.pem"), "--sds-socket="+socket)
	client := sdsClient(t, socket)
	const proxies = 40
	pods := e.createPods(t, "proxy", 2*proxies, 8)
	first := e.tokens(t, pods[:1])[0]
	waitUntil(t, 30*time.Second, "the agent to serve", func() bool {
		_, err := firstSecret(context.Background(), client, first)
		return err == nil
	})

	// connect opens one stream per pod at once, each with a new token, and
	// returns how long until all had a certificate of their own identity.
	connect := func(pods []stormPod) time.Duration {
		tokens := e.tokens(t, pods)
		var wg sync.WaitGroup
		errs := make(chan error, len(pods))
		start := time.Now()
		for i := range pods {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id, err := firstSecret(context.Background(), client, tokens[i])
				if err == nil && id != pods[i].id.String() {
					err = fmt.Errorf("certificate for %s, want %s", id, pods[i].id)
				}
				if err != nil {
					errs <- fmt.Errorf("pod %s: %w", pods[i].name, err)
				}
			}()
		}
		wg.Wait()
		d := time.Since(start)
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		return d
	}
	quiet := connect(pods[:proxies])

	// The flood: expired, wrong-audience, junk and forged tokens from four
	// processes of their own.
	valid := e.tokens(t, pods[:1])[0]
	wrongAud, err := e.podToken(pods[0], "vault")
	if err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad-tokens")
	mustWrite(t, bad, []byte(strings.Join([]string{valid, e.expired(t, valid), wrongAud}, "\n")), 0o600)
	reviewsBefore, caReviewsBefore := e.tokenReviews(t), caReviews(t, p)
	warm := make(chan struct{}, 4)
	for range 4 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), sdsFloodEnv+"="+socket+","+bad)
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			sc := bufio.NewScanner(stderr)
			for sc.Scan() {
				if sc.Text() == floodWarmLine {
					warm <- struct{}{}
					continue
				}
				t.Log(sc.Text())
			}
		}()
		t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
	}
	for range 4 {
		select {
		case <-warm:
		case <-time.After(60 * time.Second):
			t.Fatal("the flood processes did not get going within 60s")
		}
	}
	flooded := connect(pods[proxies:])
	refused := sumMetric(ag.metrics(), "meshid_agent_tokens_decided_locally_total", `result="refused"`)
	// The API server's count, less what the CA asked (it checks the
	// proxies' tokens offline, but a CA on a loaded machine may fall back
	// to reviews): what the agent asked.
	reviews := e.tokenReviews(t) - reviewsBefore - (caReviews(t, p) - caReviewsBefore)
	t.Logf("%d streams: first certificates in %s quiet, %s under a flood (%.0f bad tokens refused by the agent; %.0f TokenReviews by the agent meanwhile)",
		proxies, quiet.Round(time.Millisecond), flooded.Round(time.Millisecond), refused, reviews)
	// One review per proxy token, none for the flood.
	if max := float64(proxies); reviews > max {
		t.Errorf("%.0f TokenReviews by the agent during the flood, want at most %.0f (one per proxy token)", reviews, max)
	}
	// Generous: CI machines are shared and noisy; the point is that the
	// flood does not stop or stall first certificates.
	if flooded > 5*quiet+2*time.Second {
		t.Errorf("first certificates took %s under the flood, %s without", flooded, quiet)
	}
}

// caReviews is how many TokenReviews the CA says it sent.
func caReviews(t *testing.T, p *caProcess) float64 {
	return sumMetric(p.Metrics(t), "meshid_ca_token_reviews_total")
}

// sdsClient dials an agent's socket, as a proxy does.
func sdsClient(t *testing.T, socket string) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}
