package e2e

import (
	"bufio"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/satoken"
)

// TestIstioAgent runs Istio's own node agent, pilot-agent, standalone
// against meshid-ca over TLS, as a sidecar would in a pod, and checks the
// certificate it obtains. It needs the agent built by hack/pilot-agent.sh.
func TestIstioAgent(t *testing.T) {
	agentDir := pilotAgentDir(t)
	td := spiffeid.RequireTrustDomainFromString("cluster.local")

	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(t, dir, stateDir)
	p := startCA(t, args...)
	p.WaitReady(t, 30*time.Second)
	rootPath := filepath.Join(stateDir, "ca", "root-cert.pem")
	roots := readRoots(t, rootPath)
	_, grpcPort, err := net.SplitHostPort(p.GRPCAddr)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		env  []string // added to the agent's environment
		sa   string
		key  func(any) error
	}{
		{name: "rsa-default", sa: "web-rsa", key: func(k any) error {
			rk, ok := k.(*rsa.PublicKey)
			if !ok {
				return fmt.Errorf("key is %T, want RSA", k)
			}
			if rk.N.BitLen() != 2048 {
				return fmt.Errorf("RSA key of %d bits, want 2048", rk.N.BitLen())
			}
			return nil
		}},
		{name: "ecdsa", env: []string{"ECC_SIGNATURE_ALGORITHM=ECDSA"}, sa: "web-ecdsa", key: func(k any) error {
			ek, ok := k.(*ecdsa.PublicKey)
			if !ok {
				return fmt.Errorf("key is %T, want ECDSA", k)
			}
			if ek.Curve != elliptic.P256() {
				return fmt.Errorf("ECDSA key on %s, want P-256", ek.Curve.Params().Name)
			}
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const ns = "istio-e2e"
			id := spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+tc.sa)
			pod := tc.sa + "-5d8f7c9b4-x2k7q"
			token, err := issuer.Token(satoken.Claims{Namespace: ns, ServiceAccount: tc.sa,
				PodName: pod, PodUID: "0b6f3c1e-7a2d-4e5f-9c8b-1a2b3c4d5e6f", Audiences: []string{"istio-ca"}})
			if err != nil {
				t.Fatal(err)
			}
			okBefore := requestsOK(t, p)

			keyPEM, chainPEM, rootPEM := istioAgentCerts(t, agentDir, grpcPort, rootPath, token, ns, tc.sa, pod, tc.env)

			// The chain verifies against meshid-ca's root and names the pod's
			// service account.
			chain, err := ca.ParseCertificatesPEM(chainPEM)
			if err != nil {
				t.Fatalf("cert-chain.pem: %v", err)
			}
			if last := chain[len(chain)-1]; last.Equal(roots[0]) {
				chain = chain[:len(chain)-1] // the agent may append the root
			}
			verifySVID(t, "pilot-agent's cert-chain.pem", append(chain, roots[0]), td, roots, id)

			// The leaf certifies the agent's own key, of the expected type.
			priv, err := parsePrivateKeyPEM(keyPEM)
			if err != nil {
				t.Fatalf("key.pem: %v", err)
			}
			if pub, ok := priv.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(chain[0].PublicKey) {
				t.Errorf("the leaf's public key is not key.pem's")
			}
			if err := tc.key(chain[0].PublicKey); err != nil {
				t.Errorf("leaf: %v", err)
			}
			// It lives for the SECRET_TTL the agent asked for.
			if ttl := chain[0].NotAfter.Sub(chain[0].NotBefore); ttl < 55*time.Minute || ttl > 65*time.Minute {
				t.Errorf("leaf valid for %s (%s to %s), want about the 1h SECRET_TTL", ttl, chain[0].NotBefore, chain[0].NotAfter)
			}

			// The agent's root is meshid-ca's.
			agentRoots, err := ca.ParseCertificatesPEM(rootPEM)
			if err != nil {
				t.Fatalf("root-cert.pem: %v", err)
			}
			if len(agentRoots) != 1 || !agentRoots[0].Equal(roots[0]) {
				t.Errorf("pilot-agent's root-cert.pem holds %d certificates, not meshid-ca's root %s", len(agentRoots), ca.Fingerprint(roots[0]))
			}

			// meshid-ca counted and logged the issuance.
			if okAfter := requestsOK(t, p); okAfter <= okBefore || okAfter < 1 {
				t.Errorf(`meshid_ca_requests_total{code="OK"} went from %d to %d while pilot-agent ran, want an increase`, okBefore, okAfter)
			}
			serial := chain[0].SerialNumber.Text(16)
			// The log reaches the test through a pipe: wait for the line.
			found := false
			for deadline := time.Now().Add(10 * time.Second); !found && time.Now().Before(deadline); {
				for _, rec := range p.LogRecords("certificate issued") {
					if rec["spiffe_id"] == id.String() && rec["serial"] == serial && rec["pod"] == ns+"/"+pod {
						found = true
					}
				}
				if !found {
					time.Sleep(10 * time.Millisecond) // poll interval
				}
			}
			if !found {
				t.Errorf("meshid-ca logged no \"certificate issued\" record with spiffe_id %s, serial %s and pod %s/%s", id, serial, ns, pod)
			}
		})
	}
}

// istioAgentCerts runs pilot-agent standalone, as a sidecar's agent with
// the settings of Istio's injection (the projected token, the root from the
// istio-ca-root-cert mount), against meshid-ca on localhost:grpcPort, and
// returns the files it writes once its certificate has come.
func istioAgentCerts(t *testing.T, agentDir, grpcPort, rootPath, token, ns, sa, pod string, extraEnv []string) (keyPEM, chainPEM, rootPEM []byte) {
	t.Helper()
	work := t.TempDir()
	outDir := filepath.Join(work, "certs")
	mustWrite(t, filepath.Join(work, "var/run/secrets/tokens/istio-token"), []byte(token), 0o600)
	tmpl, err := os.ReadFile(filepath.Join(agentDir, "envoy_bootstrap_tmpl.json"))
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(work, "var/lib/istio/envoy/envoy_bootstrap_tmpl.json"), tmpl, 0o644)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		t.Fatal(err)
	}
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + work,
		"CLOUD_PLATFORM=none",
		"DISABLE_ENVOY=true",
		"OUTPUT_CERTS=" + outDir,
		// A host containing "localhost" makes the agent send SNI
		// istiod.istio-system.svc, which the CA's certificate names.
		"CA_ADDR=localhost:" + grpcPort,
		"CA_ROOT_CA=" + rootPath,
		"POD_NAME=" + pod,
		"POD_NAMESPACE=" + ns,
		"SERVICE_ACCOUNT=" + sa,
		"INSTANCE_IP=127.0.0.1",
		"ISTIO_META_CLUSTER_ID=Kubernetes",
		"TRUST_DOMAIN=cluster.local",
		"JWT_POLICY=third-party-jwt",
		"SECRET_TTL=1h",
		fmt.Sprintf(`PROXY_CONFIG={"statusPort":%d,"controlPlaneAuthPolicy":"NONE"}`, freeTCPPort(t)),
	}
	agent := startPilotAgent(t, agentDir, work, append(env, extraEnv...))
	return agent.waitCerts(t, outDir, 20*time.Second)
}

// pilotAgentDir finds the directory hack/pilot-agent.sh builds into, or skips
// the test (fails it when MESHID_REQUIRE_ISTIO=1).
func pilotAgentDir(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no pilot-agent")
	}
	dir := os.Getenv("MESHID_PILOT_AGENT_DIR")
	if dir == "" {
		version, err := pinnedIstioVersion("../hack/pilot-agent/go.mod")
		if err != nil {
			t.Fatal(err)
		}
		cacheRoot := kubetest.CacheDir()
		dir = filepath.Join(cacheRoot, "istio", version)
	}
	var missing []string
	if fi, err := os.Stat(filepath.Join(dir, "pilot-agent")); err != nil || fi.Mode()&0o111 == 0 {
		missing = append(missing, "pilot-agent")
	}
	if fi, err := os.Stat(filepath.Join(dir, "envoy_bootstrap_tmpl.json")); err != nil || fi.Size() == 0 {
		missing = append(missing, "envoy_bootstrap_tmpl.json")
	}
	if len(missing) > 0 {
		msg := fmt.Sprintf("no Istio pilot-agent: %s missing in %s; build it with hack/pilot-agent.sh (or set MESHID_PILOT_AGENT_DIR)", strings.Join(missing, " and "), dir)
		if os.Getenv("MESHID_REQUIRE_ISTIO") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return dir
}

// pinnedIstioVersion reads the istio.io/istio version a go.mod requires.
func pinnedIstioVersion(goMod string) (string, error) {
	f, err := os.Open(goMod)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 0 && fields[0] == "require" {
			fields = fields[1:]
		}
		if len(fields) >= 2 && fields[0] == "istio.io/istio" {
			return fields[1], nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("%s requires no istio.io/istio", goMod)
}

// pilotAgent is a running pilot-agent.
type pilotAgent struct {
	cmd    *exec.Cmd
	exited chan struct{}
	out    *lockedBuffer
}

// startPilotAgent runs `pilot-agent proxy sidecar` in workDir with env, and
// stops it with SIGTERM when t ends, logging its output if t failed.
func startPilotAgent(t *testing.T, agentDir, workDir string, env []string) *pilotAgent {
	t.Helper()
	cmd := exec.Command(filepath.Join(agentDir, "pilot-agent"), "proxy", "sidecar", "--log_output_level=default:warn")
	cmd.Dir = workDir
	cmd.Env = env
	a := &pilotAgent{cmd: cmd, exited: make(chan struct{}), out: &lockedBuffer{}}
	cmd.Stdout, cmd.Stderr = a.out, a.out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-a.exited
			t.Errorf("pilot-agent did not stop within 20s of SIGTERM")
		}
		if t.Failed() {
			t.Logf("pilot-agent environment: %q\npilot-agent output:\n%s", env, a.out.String())
		}
	})
	return a
}

// waitCerts waits until the agent has written a complete key.pem,
// cert-chain.pem and root-cert.pem into outDir, and returns them.
func (a *pilotAgent) waitCerts(t *testing.T, outDir string, within time.Duration) (key, chain, root []byte) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		key, chain, root, err := readAgentCerts(outDir)
		if err == nil {
			return key, chain, root
		}
		if time.Now().After(deadline) {
			t.Fatalf("pilot-agent wrote no certificates into %s within %s: %v", outDir, within, err)
		}
		select {
		case <-a.exited:
			t.Fatalf("pilot-agent exited (%v) before writing its certificates: %v", a.cmd.ProcessState, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// readAgentCerts reads the agent's output files, failing until each holds
// complete PEM.
func readAgentCerts(dir string) (key, chain, root []byte, err error) {
	// root-cert.pem is written last; a partly written file fails to parse.
	if root, err = os.ReadFile(filepath.Join(dir, "root-cert.pem")); err != nil {
		return nil, nil, nil, err
	}
	if _, err := ca.ParseCertificatesPEM(root); err != nil {
		return nil, nil, nil, fmt.Errorf("root-cert.pem: %w", err)
	}
	if chain, err = os.ReadFile(filepath.Join(dir, "cert-chain.pem")); err != nil {
		return nil, nil, nil, err
	}
	if _, err := ca.ParseCertificatesPEM(chain); err != nil {
		return nil, nil, nil, fmt.Errorf("cert-chain.pem: %w", err)
	}
	if key, err = os.ReadFile(filepath.Join(dir, "key.pem")); err != nil {
		return nil, nil, nil, err
	}
	if _, err := parsePrivateKeyPEM(key); err != nil {
		return nil, nil, nil, fmt.Errorf("key.pem: %w", err)
	}
	return key, chain, root, nil
}

// parsePrivateKeyPEM decodes a PKCS#8, PKCS#1 or SEC 1 private key.
func parsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	var k any
	var err error
	switch block.Type {
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	if err != nil {
		return nil, err
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%T is not a private key", k)
	}
	return signer, nil
}

var okRequests = regexp.MustCompile(`(?m)^meshid_ca_requests_total\{code="OK"\} (\S+)$`)

// requestsOK reads meshid_ca_requests_total{code="OK"} (0 before the first
// success, when the series does not exist yet).
func requestsOK(t *testing.T, p *caProcess) int {
	t.Helper()
	m := okRequests.FindStringSubmatch(p.Metrics(t))
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("meshid_ca_requests_total{code=\"OK\"} %q: %v", m[1], err)
	}
	return int(v)
}

// freeTCPPort returns a port free on all interfaces a moment ago.
func freeTCPPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func mustWrite(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}
