// Command meshid-demo runs meshid-ca locally on its embedded default (a state
// directory, tokens checked offline against a local issuer's JWKS, no
// cluster) and shows certificates being issued and refused.
package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/satoken"
)

const issuerURL = "https://meshid-demo.local"

func main() {
	dir := flag.String("dir", ".meshid-demo", "where the demo keeps its state (CA keys, token issuer key, issued certificates)")
	grpcAddr := flag.String("grpc-addr", "127.0.0.1:15012", "meshid-ca's gRPC address")
	httpAddr := flag.String("http-addr", "127.0.0.1:15014", "meshid-ca's health and metrics address")
	adminAddr := flag.String("admin-addr", "127.0.0.1:15013", "meshid-ca's admin API address (meshidctl)")
	caBinary := flag.String("ca-binary", "", "meshid-ca binary (default: next to this one; meshid-agent is looked for beside it)")
	certTTL := flag.Duration("cert-ttl", 6*time.Second, "lifetime of the workloads' certificates, short so that rotations show")
	duration := flag.Duration("duration", 20*time.Second, "how long the two workloads talk before the demo shows refusals and stops")
	stay := flag.Bool("stay", false, "after the demo, keep meshid-ca and meshid-agent running until Ctrl-C, to try meshidctl against them")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *dir, *grpcAddr, *httpAddr, *adminAddr, *caBinary, *certTTL, *duration, *stay); err != nil {
		fmt.Fprintln(os.Stderr, "meshid-demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("\n▶ "+format+"\n", args...) }
func info(format string, args ...any) { fmt.Printf("  "+format+"\n", args...) }

func run(ctx context.Context, dir, grpcAddr, httpAddr, adminAddr, caBinary string, certTTL, duration time.Duration, stay bool) error {
	if caBinary == "" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		caBinary = filepath.Join(filepath.Dir(self), "meshid-ca")
	}
	// Absolute, because gRPC reads "unix://" addresses as absolute paths.
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	issuer, err := satoken.LoadOrCreate(issuerURL, filepath.Join(dir, "token-issuer-key.pem"))
	if err != nil {
		return err
	}
	jwksPath := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(jwksPath, issuer.JWKS(), 0o644); err != nil {
		return err
	}
	stateDir := filepath.Join(dir, "ca-state")

	// Another process on these ports (an earlier demo, a meshid-ca of your
	// own) would answer in this one's place.
	for _, a := range []struct{ flag, addr string }{{"--grpc-addr", grpcAddr}, {"--http-addr", httpAddr}, {"--admin-addr", adminAddr}} {
		l, err := net.Listen("tcp", a.addr)
		if err != nil {
			return fmt.Errorf("%s is not free (%v): is a meshid-ca or an earlier demo still running? Stop it, or pick other ports with %s", a.addr, err, a.flag)
		}
		l.Close()
	}

	step("starting meshid-ca on its embedded default")
	info("state directory %s, tokens checked offline against %s, gRPC+TLS on %s", stateDir, jwksPath, grpcAddr)
	logPath := filepath.Join(dir, "meshid-ca.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.Command(caBinary,
		"--ca-source=dir", "--state-dir="+stateDir,
		"--auth=jwks", "--jwks-file="+jwksPath, "--token-issuer="+issuerURL,
		"--grpc-addr="+grpcAddr, "--http-addr="+httpAddr, "--log-format=text",
		"--admin-addr="+adminAddr, "--admin-service-accounts="+adminSA, "--bundle-endpoint-addr=127.0.0.1:0")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	diesWithUs(cmd)
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w (build it with: make build)", caBinary, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		step("stopping meshid-ca")
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		info("stopped; its log is in %s", logPath)
	}()
	if err := waitReady(ctx, "http://"+httpAddr+"/readyz", exited); err != nil {
		return fmt.Errorf("%w; the end of its log (%s):\n%s", err, logPath, tail(logPath, 20))
	}
	rootPEM, err := os.ReadFile(filepath.Join(stateDir, "ca", "root-cert.pem"))
	if err != nil {
		return err
	}
	roots, err := ca.ParseCertificatesPEM(rootPEM)
	if err != nil {
		return err
	}
	info("ready in %s; root %q, SHA-256 %s…", time.Since(started).Round(time.Millisecond), roots[0].Subject.CommonName, ca.Fingerprint(roots[0])[:16])

	conn, err := agent.DialCA(grpcAddr, func() []*x509.Certificate { return roots }, "localhost")
	if err != nil {
		return err
	}
	defer conn.Close()
	client := agent.NewCAClient(conn, "demo")
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id := spiffeid.RequireFromPath(td, "/ns/demo/sa/web")
	token, err := issuer.Token(satoken.Claims{Namespace: "demo", ServiceAccount: "web", PodName: "web-7d4b9", PodUID: "3f1c6a52-0d5e-4b0e-9d1a-2a9c1e0b7f11", Audiences: []string{"istio-ca"}})
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}

	step("pod demo/web-7d4b9 (service account demo/web) asks for a certificate")
	info("its ECDSA P-256 key stays here; the CSR names %s; the token is for audience istio-ca", id)
	chain, err := sign(ctx, client, key, id, token, time.Hour)
	if err != nil {
		return err
	}
	leaf := chain[0]
	info("issued: serial %x", leaf.SerialNumber)
	info("        valid %s → %s", leaf.NotBefore.Local().Format(time.TimeOnly), leaf.NotAfter.Local().Format(time.TimeOnly))
	names := []string{}
	for _, c := range chain[1:] {
		names = append(names, c.Subject.CommonName)
	}
	info("        chain: leaf → %s", strings.Join(names, " → "))
	got, _, err := x509svid.Verify(chain[:len(chain)-1], x509bundle.FromX509Authorities(td, roots))
	if err != nil {
		return fmt.Errorf("go-spiffe refused the chain: %w", err)
	}
	info("verified by go-spiffe's x509svid.Verify: %s", got)
	out := filepath.Join(dir, "web-cert-chain.pem")
	var buf bytes.Buffer
	for _, c := range chain {
		buf.Write(ca.EncodePEM(c))
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		return err
	}
	info("chain written to %s (inspect: openssl x509 -in %s -noout -text)", out, out)

	step("the same pod asks for spiffe://cluster.local/ns/demo/sa/admin")
	_, err = sign(ctx, client, key, spiffeid.RequireFromPath(td, "/ns/demo/sa/admin"), token, time.Hour)
	if err := refused(err); err != nil {
		return err
	}

	step("a token minted for another audience (the API server's)")
	wrongAud, _ := issuer.Token(satoken.Claims{Namespace: "demo", ServiceAccount: "web", Audiences: []string{"https://kubernetes.default.svc"}})
	_, err = sign(ctx, client, key, id, wrongAud, time.Hour)
	if err := refused(err); err != nil {
		return err
	}

	step("a request for 30 days is clamped to the 24h maximum")
	chain, err = sign(ctx, client, key, id, token, 30*24*time.Hour)
	if err != nil {
		return err
	}
	info("issued until %s, %s from now", chain[0].NotAfter.Local().Format(time.DateTime), time.Until(chain[0].NotAfter).Round(time.Minute))

	m := &mesh{dir: dir, binDir: filepath.Dir(caBinary), caAddr: grpcAddr, adminAddr: adminAddr, rootFile: filepath.Join(stateDir, "ca", "root-cert.pem"),
		jwksPath: jwksPath, issuer: issuer, certTTL: certTTL, duration: duration, stay: stay}
	return m.run(ctx)
}

func sign(ctx context.Context, client *agent.CAClient, key crypto.Signer, id spiffeid.ID, token string, ttl time.Duration) ([]*x509.Certificate, error) {
	csrPEM, err := agent.NewCSR(key, id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return client.Sign(ctx, csrPEM, token, ttl)
}

// refused reports a refusal, and fails the demo if the request was granted.
func refused(err error) error {
	if err == nil {
		info("UNEXPECTED: issued")
		return errors.New("a request that must be refused was granted")
	}
	st := status.Convert(err)
	info("refused: %s: %s", st.Code(), st.Message())
	return nil
}

// tail is the last n lines of the file at path.
func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func waitReady(ctx context.Context, url string, exited <-chan error) error {
	deadline := time.After(30 * time.Second)
	// A probe that hangs (something else on the port that never answers)
	// must not outlast the deadline.
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case err := <-exited:
			return fmt.Errorf("meshid-ca exited: %v", err)
		case <-deadline:
			return errors.New("meshid-ca not ready after 30s")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
