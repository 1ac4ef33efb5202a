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
// a process, for 1000 identities with one open SDS stream each, against the
// same agent holding one: with one connection per proxy, as on a node, and
// with the streams multiplexed over 10 connections, where gRPC's cost per
// connection all but vanishes. In the same run it measures the gRPC floor
// the same way: a bare SDS server with the agent's gRPC settings serving
// one canned secret (serveSDSFloor), so the agent's own cost shows apart
// from gRPC's. Run with -benchtime=1x. Reported per 1000 identities: the
// growth of the agent's resident set, Go heap in use and goroutine stacks;
// the same for the floor; and the agent's resident set growth beyond the
// floor's.
func BenchmarkAgentNodeMemory(b *testing.B) {
	for _, conns := range []int{1000, 10} {
		b.Run(fmt.Sprintf("connections=%d", conns), func(b *testing.B) { benchmarkAgentNodeMemory(b, conns) })
	}
}

func benchmarkAgentNodeMemory(b *testing.B, conns int) {
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

	// The floor first, then the agent; each on its own socket.
	floorSocket := filepath.Join(sockDir, "floor")
	floorHTTP := fmt.Sprintf("127.0.0.1:%d", freeTCPPort(b))
	floor := exec.Command(os.Args[0])
	floor.Env = append(os.Environ(), floorEnv+"="+floorSocket+","+floorHTTP)
	floor.Stderr = os.Stderr
	if err := floor.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { floor.Process.Kill(); floor.Wait() }()

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

	tokens := make([]string, identities+1)
	for i := range tokens {
		tokens[i], err = issuer.Token(satoken.Claims{Namespace: "bench", ServiceAccount: fmt.Sprintf("sa-%d", i), Audiences: []string{"istio-ca"}})
		if err != nil {
			b.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clients := map[string][]secretv3.SecretDiscoveryServiceClient{}
	open := func(socket string, i int) {
		if len(clients[socket]) < conns {
			conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { conn.Close() })
			clients[socket] = append(clients[socket], secretv3.NewSecretDiscoveryServiceClient(conn))
		}
		sctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tokens[i])
		stream, err := clients[socket][i%len(clients[socket])].StreamSecrets(sctx, grpc.WaitForReady(true))
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

	waitHTTP(b, floorHTTP)
	open(floorSocket, 0)
	frss0, fheap0, fstack0 := agentMemory(b, floor.Process.Pid, floorHTTP)
	for i := 1; i <= identities; i++ {
		open(floorSocket, i)
	}
	frss1, fheap1, fstack1 := agentMemory(b, floor.Process.Pid, floorHTTP)
	floorGrowth := frss1 - frss0

	open(socket, 0)
	rss0, heap0, stack0 := agentMemory(b, cmd.Process.Pid, httpAddr)
	b.ResetTimer()
	for range b.N {
		for i := 1; i <= identities; i++ {
			open(socket, i)
		}
	}
	b.StopTimer()
	rss1, heap1, stack1 := agentMemory(b, cmd.Process.Pid, httpAddr)
	if path := os.Getenv("MESHID_AGENT_HEAP_PROFILE"); path != "" {
		saveProfile(b, "http://"+httpAddr+"/debug/pprof/heap?gc=1", path)
		saveProfile(b, "http://"+httpAddr+"/debug/pprof/goroutine?debug=1", path+".goroutines.txt")
	}
	const mb = 1 << 20
	b.ReportMetric(float64(rss1-rss0)/mb, "RSS-MB/1000-identities")
	b.ReportMetric(float64(heap1-heap0)/mb, "heap-MB/1000-identities")
	b.ReportMetric(float64(stack1-stack0)/mb, "stack-MB/1000-identities")
	b.ReportMetric(float64(floorGrowth)/mb, "floor-RSS-MB/1000-identities")
	b.ReportMetric(float64(fheap1-fheap0)/mb, "floor-heap-MB/1000-identities")
	b.ReportMetric(float64(fstack1-fstack0)/mb, "floor-stack-MB/1000-identities")
	b.ReportMetric(float64(rss1-rss0-floorGrowth)/mb, "beyond-floor-MB/1000-identities")
	b.ReportMetric(float64(rss1)/mb, "RSS-MB-total")
}

// waitHTTP waits until something answers at addr.
func waitHTTP(b *testing.B, addr string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("nothing answers at %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}

func saveProfile(b *testing.B, url, path string) {
	resp, err := http.Get(url)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	io.Copy(out, resp.Body)
}

// processRSS reads a process's resident set from /proc.
func processRSS(b *testing.B, pid int) int64 {
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
			return kb << 10
		}
	}
	b.Fatalf("no VmRSS for process %d", pid)
	return 0
}

// agentMemory reads the process's resident set from /proc and its Go heap
// and stacks in use from its /metrics.
func agentMemory(b *testing.B, pid int, httpAddr string) (rss, heap, stack int64) {
	b.Helper()
	rss = processRSS(b, pid)
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
