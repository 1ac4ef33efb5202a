package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshid/meshid/internal/satoken"
	"github.com/meshid/meshid/sds"
)

// BenchmarkAgentNodeMemory measures meshid-agent's memory in node mode, as
// a process, for 1000 identities each with one open SDS stream, against
// the same agent holding one. Run with -benchtime=1x; reported: the growth
// of its resident set, of its Go heap in use and of its goroutine stacks,
// per 1000 identities.
func BenchmarkAgentNodeMemory(b *testing.B) {
	const identities = 1000
	dir := b.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(b, dir, stateDir)
	p := startCA(b, append(args, "--rate-limit=0")...)
	p.WaitReady(b, 30*time.Second)

	sockDir, err := os.MkdirTemp("", "mem")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	socket := filepath.Join(sockDir, "socket")
	httpAddr := fmt.Sprintf("127.0.0.1:%d", freeTCPPort(b))
	cmd := exec.Command(filepath.Join(binDir, "meshid-agent"), "--mode=node",
		"--auth=jwks", "--jwks-file="+filepath.Join(dir, "jwks.json"), "--token-issuer=https://meshid-e2e.local",
		"--ca-addr="+p.GRPCAddr, "--ca-server-name=localhost", "--ca-root-file="+filepath.Join(stateDir, "ca", "root-cert.pem"),
		"--sds-socket="+socket, "--http-addr="+httpAddr, "--log-level=warn", "--profiling")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conns := make([]secretv3.SecretDiscoveryServiceClient, identities+1) // one connection per proxy, as on a node
	for i := range conns {
		conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		conns[i] = secretv3.NewSecretDiscoveryServiceClient(conn)
	}
	open := func(i int) {
		tok, err := issuer.Token(satoken.Claims{Namespace: "bench", ServiceAccount: fmt.Sprintf("sa-%d", i), Audiences: []string{"istio-ca"}})
		if err != nil {
			b.Fatal(err)
		}
		sctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
		stream, err := conns[i%len(conns)].StreamSecrets(sctx, grpc.WaitForReady(true))
		if err != nil {
			b.Fatal(err)
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType}); err != nil {
			b.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			b.Fatal(err)
		}
		stream.Send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType})
	}
	open(0)
	rss0, heap0, stack0 := agentMemory(b, cmd.Process.Pid, httpAddr)
	b.ResetTimer()
	for range b.N {
		for i := 1; i <= identities; i++ {
			open(i)
		}
	}
	b.StopTimer()
	rss1, heap1, stack1 := agentMemory(b, cmd.Process.Pid, httpAddr)
	if path := os.Getenv("MESHID_AGENT_HEAP_PROFILE"); path != "" {
		resp, err := http.Get("http://" + httpAddr + "/debug/pprof/heap?gc=1")
		if err != nil {
			b.Fatal(err)
		}
		out, _ := os.Create(path)
		io.Copy(out, resp.Body)
		out.Close()
		resp.Body.Close()
	}
	b.ReportMetric(float64(rss1-rss0)/(1<<20), "RSS-MB/1000-identities")
	b.ReportMetric(float64(heap1-heap0)/(1<<20), "heap-MB/1000-identities")
	b.ReportMetric(float64(stack1-stack0)/(1<<20), "stack-MB/1000-identities")
	b.ReportMetric(float64(rss1)/(1<<20), "RSS-MB-total")
}

// agentMemory reads the process's resident set from /proc and its Go heap
// in use from its /metrics.
func agentMemory(b *testing.B, pid int, httpAddr string) (rss, heap, stack int64) {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			rss = kb << 10
		}
	}
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "go_memstats_heap_inuse_bytes "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			heap = int64(f)
		}
		if v, ok := strings.CutPrefix(line, "go_memstats_stack_inuse_bytes "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			stack = int64(f)
		}
	}
	return rss, heap, stack
}
