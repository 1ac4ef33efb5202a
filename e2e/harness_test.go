// Package e2e runs the meshid binaries as processes against real parts: a
// kube-apiserver, Istio's agent, go-spiffe.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/satoken"
)

// binDir holds the binaries TestMain builds from this checkout.
var binDir string

func TestMain(m *testing.M) {
	if v := os.Getenv(floorEnv); v != "" {
		socket, httpAddr, _ := strings.Cut(v, ",")
		if err := serveSDSFloor(socket, httpAddr); err != nil {
			fmt.Fprintln(os.Stderr, "floor:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if v := os.Getenv(sdsFloodEnv); v != "" {
		socket, file, _ := strings.Cut(v, ",")
		if err := floodSDS(socket, file); err != nil {
			fmt.Fprintln(os.Stderr, "flood:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "meshid-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/meshid/meshid/cmd/meshid-ca", "github.com/meshid/meshid/cmd/meshid-demo", "github.com/meshid/meshid/cmd/meshid-agent", "github.com/meshid/meshid/cmd/meshidctl")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building the binaries:", err)
		return 1
	}
	binDir = dir
	return m.Run()
}

// binary is the meshid program name the tests run: this checkout's, or
// the one $env names (an older build, for the before figures of a benchmark
// such as hack/storm.sh: MESHID_E2E_CA_BIN, MESHID_E2E_AGENT_BIN).
func binary(name, env string) string {
	if bin := os.Getenv(env); bin != "" {
		return bin
	}
	return filepath.Join(binDir, name)
}

// caProcess is a running meshid-ca.
type caProcess struct {
	GRPCAddr  string
	HTTPAddr  string
	AdminAddr string // empty unless started with admins

	cmd    *exec.Cmd
	exited chan struct{}
	log    *lockedBuffer
	addrs  chan [3]string
}

// startCA runs meshid-ca with args plus free loopback ports and JSON logs,
// waits until it listens, and stops it when t ends.
func startCA(t testing.TB, args ...string) *caProcess {
	t.Helper()
	p := launchCA(t, args...)
	p.WaitServing(t)
	return p
}

// launchCA starts meshid-ca like startCA but returns at once; call
// WaitServing before using its addresses.
func launchCA(t testing.TB, args ...string) *caProcess {
	t.Helper()
	args = append([]string{"--grpc-addr=127.0.0.1:0", "--http-addr=127.0.0.1:0", "--admin-addr=127.0.0.1:0", "--bundle-endpoint-addr=127.0.0.1:0", "--log-format=json", "--log-level=debug"}, args...)
	cmd := exec.Command(binary("meshid-ca", "MESHID_E2E_CA_BIN"), args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &caProcess{cmd: cmd, exited: make(chan struct{}), log: &lockedBuffer{}, addrs: make(chan [3]string, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			p.log.Write(append(line, '\n'))
			var rec struct {
				Msg       string `json:"msg"`
				GRPCAddr  string `json:"grpc_addr"`
				HTTPAddr  string `json:"http_addr"`
				AdminAddr string `json:"admin_addr"`
			}
			if json.Unmarshal(line, &rec) == nil && rec.Msg == "meshid-ca serving" {
				p.addrs <- [3]string{rec.GRPCAddr, rec.HTTPAddr, rec.AdminAddr}
			}
		}
		io.Copy(io.Discard, stderr)
		// Wait only once stderr is drained: Wait closes the pipe, and the
		// last lines (shutting down) must be in the log when exited closes.
		cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.Stop(t)
		if t.Failed() {
			t.Logf("meshid-ca %v log:\n%s", args, p.log.String())
		}
	})
	return p
}

// WaitServing waits until the process listens and learns its addresses.
func (p *caProcess) WaitServing(t testing.TB) {
	t.Helper()
	select {
	case a := <-p.addrs:
		p.GRPCAddr, p.HTTPAddr, p.AdminAddr = a[0], a[1], a[2]
	case <-p.exited:
		t.Fatalf("meshid-ca exited before serving: %v\n%s", p.cmd.ProcessState, p.log.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("meshid-ca not serving after 60s:\n%s", p.log.String())
	}
}

// Stop sends SIGTERM and waits for the process to exit.
func (p *caProcess) Stop(t testing.TB) {
	t.Helper()
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("meshid-ca did not stop within 20s of SIGTERM")
	}
}

// WaitReady waits until /readyz answers 200.
func (p *caProcess) WaitReady(t testing.TB, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get("http://" + p.HTTPAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("meshid-ca not ready after %s (last: %v)\n%s", within, err, p.log.String())
		}
		select {
		case <-p.exited:
			t.Fatalf("meshid-ca exited: %s", p.log.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Metrics returns the /metrics text.
func (p *caProcess) Metrics(t testing.TB) string {
	t.Helper()
	resp, err := http.Get("http://" + p.HTTPAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Client dials the CA over TLS, trusting roots.
func (p *caProcess) Client(t testing.TB, roots []*x509.Certificate) *agent.CAClient {
	t.Helper()
	conn, err := agent.DialCA(p.GRPCAddr, func() []*x509.Certificate { return roots }, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return agent.NewCAClient(conn, "Kubernetes")
}

// Log returns everything the process wrote so far.
func (p *caProcess) Log() string { return p.log.String() }

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// readRoots reads a PEM bundle.
func readRoots(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := ca.ParseCertificatesPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

var (
	keyOnce     sync.Once
	workloadKey crypto.Signer
)

// sign asks for a certificate naming id with a P-256 key.
func sign(ctx context.Context, c *agent.CAClient, id spiffeid.ID, token string) ([]*x509.Certificate, error) {
	keyOnce.Do(func() {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		workloadKey = k
	})
	csrPEM, err := agent.NewCSR(workloadKey, id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return c.Sign(ctx, csrPEM, token, time.Hour)
}

// LogRecords returns the JSON log records whose msg is msg, in order.
func (p *caProcess) LogRecords(msg string) []map[string]any {
	var recs []map[string]any
	for _, line := range bytes.Split([]byte(p.Log()), []byte("\n")) {
		var rec map[string]any
		if json.Unmarshal(line, &rec) == nil && rec["msg"] == msg {
			recs = append(recs, rec)
		}
	}
	return recs
}

// jwksCAArgs makes a local service-account token issuer, writes its JWKS
// into dir and returns it with the meshid-ca arguments of the embedded
// default (--ca-source=dir on stateDir, --auth=jwks against that JWKS).
func jwksCAArgs(t testing.TB, dir, stateDir string) (*satoken.Issuer, []string) {
	t.Helper()
	const issuerURL = "https://meshid-e2e.local"
	issuer, err := satoken.New(issuerURL)
	if err != nil {
		t.Fatal(err)
	}
	jwks := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(jwks, issuer.JWKS(), 0o644); err != nil {
		t.Fatal(err)
	}
	return issuer, []string{"--ca-source=dir", "--state-dir=" + stateDir,
		"--auth=jwks", "--jwks-file=" + jwks, "--token-issuer=" + issuerURL}
}

// agentProcess is a running meshid-agent in pod mode for shop/web.
type agentProcess struct {
	cmd      *exec.Cmd
	httpAddr string
	log      *lockedBuffer
	exited   chan struct{}
}

func startAgent(t *testing.T, args ...string) *agentProcess {
	t.Helper()
	a := &agentProcess{httpAddr: fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t)), log: &lockedBuffer{}, exited: make(chan struct{})}
	a.cmd = exec.Command(binary("meshid-agent", "MESHID_E2E_AGENT_BIN"), append([]string{"--http-addr=" + a.httpAddr, "--log-format=text"}, args...)...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		a.stop()
		if t.Failed() {
			t.Logf("meshid-agent log:\n%s", a.log.String())
		}
	})
	return a
}

func (a *agentProcess) stop() {
	a.cmd.Process.Signal(syscall.SIGTERM)
	<-a.exited
}

// podAgentArgs sets up a token and returns the agent flags for shop/web.
func podAgentArgs(t *testing.T, issuer *satoken.Issuer, dir, stateDir, caAddr, socket string) []string {
	t.Helper()
	token, err := issuer.Token(satoken.Claims{Namespace: "shop", ServiceAccount: "web", Audiences: []string{"istio-ca"}})
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "istio-token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--ca-addr=" + caAddr, "--ca-server-name=localhost",
		"--ca-root-file=" + filepath.Join(stateDir, "ca", "root-cert.pem"),
		"--namespace=shop", "--service-account=web", "--token-file=" + tokenFile,
		"--sds-socket=" + socket, "--cert-ttl=6s"}
}

func shortSocket(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "socket")
}
