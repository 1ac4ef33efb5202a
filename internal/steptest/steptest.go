package steptest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/poll"
)

// Version is the step-ca release hack/step-ca.sh builds (pinned in
// hack/step-ca/go.mod; a test checks the two agree).
const Version = "v0.30.2"

// DirEnv names the directory holding step-ca (hack/step-ca.sh prints it).
const DirEnv = "MESHID_STEP_CA_DIR"

// RequireEnv, set to 1, makes a missing binary a failure instead of a skip
// (hack/test.sh sets it: CI must never skip these tests).
const RequireEnv = "MESHID_REQUIRE_STEP"

// CA is a running step-ca.
type CA struct {
	// URL is https://127.0.0.1:<port>, step-ca's API (/1.0/sign, /health,
	// /roots, /provisioners ...).
	URL string
	// Root is step-ca's root: the mesh root of a meshid-ca under it.
	Root *x509.Certificate
	// Intermediate is the certificate step-ca signs with.
	Intermediate *x509.Certificate
	Provisioner  Provisioner
	TrustDomain  string
	// Dir holds ca.json, the certificates, the key and step-ca.log.
	Dir string

	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	stop   sync.Once
	bin    string
	pki    *PKI
	addr   string
}

// Binary returns the path of step-ca, or skips t (fails it under
// RequireEnv) when it is not built. -short skips it too.
func Binary(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no step-ca")
	}
	dir := os.Getenv(DirEnv)
	if dir == "" {
		dir = filepath.Join(kubetest.CacheDir(), "step-ca", Version)
	}
	bin := filepath.Join(dir, "step-ca")
	if fi, err := os.Stat(bin); err != nil || fi.Mode()&0o111 == 0 {
		msg := fmt.Sprintf("no step-ca in %s: build it with hack/step-ca.sh (or set %s=$(hack/step-ca.sh))", dir, DirEnv)
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin
}

// Start makes a PKI with opts, starts step-ca with it on a free loopback
// port, and returns once /health answers. The CA stops when t ends; its log
// is shown if t failed.
func Start(t testing.TB, opts Options) *CA {
	t.Helper()
	bin := Binary(t)
	pki, err := NewPKI(opts)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// The port is free when picked but may be taken before step-ca binds
	// it: try again with another one then.
	const attempts = 3
	for i := 1; ; i++ {
		addr, err := freeAddr()
		if err != nil {
			t.Fatal(err)
		}
		ca, err := start(t, bin, pki, dir, addr)
		if err == nil {
			return ca
		}
		if !errors.Is(err, errAddrInUse) || i == attempts {
			t.Fatal(err)
		}
	}
}

var errAddrInUse = errors.New("address already in use")

// Restart stops step-ca (if it runs) and starts it again with the same
// PKI, directory and address, as after an outage; it returns the new
// process's CA.
func (ca *CA) Restart(t testing.TB) *CA {
	t.Helper()
	ca.Stop()
	next, err := start(t, ca.bin, ca.pki, ca.Dir, ca.addr)
	if err != nil {
		t.Fatal(err)
	}
	return next
}

func start(t testing.TB, bin string, pki *PKI, dir, addr string) (*CA, error) {
	t.Helper()
	config, err := pki.WriteConfig(dir, addr)
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "step-ca.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own descriptor

	cmd := exec.Command(bin, config)
	cmd.Dir = dir
	// STEPPATH and HOME: step-ca looks for step's contexts and defaults in
	// $STEPPATH (default ~/.step); a user's own must not change what runs.
	cmd.Env = append(os.Environ(), "STEPPATH="+filepath.Join(dir, "step"), "HOME="+dir)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Its own process group, so that a signal to the test's group (^C)
	// reaches it only through Stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ca := &CA{
		URL:          "https://" + addr,
		Root:         pki.Root,
		Intermediate: pki.Intermediate,
		Provisioner:  pki.Provisioner,
		TrustDomain:  pki.TrustDomain,
		Dir:          dir,
		cmd:          cmd,
		exited:       make(chan struct{}),
		bin:          bin,
		pki:          pki,
		addr:         addr,
	}
	go func() {
		cmd.Wait()
		close(ca.exited)
	}()

	client := ca.HTTPClient()
	healthy := false
	poll.Until(t, "step-ca to answer /health or exit", func() bool {
		select {
		case <-ca.exited:
			return true
		default:
		}
		healthy = health(client, ca.URL) == nil
		return healthy
	})
	if !healthy {
		log, _ := os.ReadFile(logPath)
		err := fmt.Errorf("step-ca exited at start (%v); its log:\n%s", cmd.ProcessState, trimLog(string(log)))
		if bytes.Contains(log, []byte("address already in use")) {
			err = fmt.Errorf("%w: %w", errAddrInUse, err)
		}
		return nil, err
	}
	t.Cleanup(func() {
		ca.Stop()
		if t.Failed() {
			log, _ := os.ReadFile(logPath)
			t.Logf("step-ca log (%s):\n%s", logPath, log)
		}
	})
	return ca, nil
}

// freeAddr returns a loopback address with a port free at the time.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// health asks step-ca's /health, which answers {"status":"ok"} once the
// authority is initialised and the TLS listener is up.
func health(c *http.Client, url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		Status string `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || body.Status != "ok" {
		return fmt.Errorf("/health: %s %q", resp.Status, body.Status)
	}
	return nil
}

// RootPool holds only step-ca's root.
func (ca *CA) RootPool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(ca.Root)
	return pool
}

// HTTPClient trusts step-ca's root and nothing else. step-ca's serving
// certificate is issued by its intermediate for the IP in URL.
func (ca *CA) HTTPClient() *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.RootPool(), MinVersion: tls.VersionTLS12},
		},
	}
}

// Log returns what step-ca has written so far.
func (ca *CA) Log() string {
	b, _ := os.ReadFile(filepath.Join(ca.Dir, "step-ca.log"))
	return string(b)
}

// Stop ends step-ca (SIGTERM, then SIGKILL after 10s) and waits for it.
// Safe to call more than once; Start's cleanup calls it.
func (ca *CA) Stop() {
	ca.stop.Do(func() {
		ca.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-ca.exited:
		case <-time.After(10 * time.Second):
			ca.cmd.Process.Kill()
			<-ca.exited
		}
	})
}

// Exited tells whether step-ca has ended (after Stop, or by itself).
func (ca *CA) Exited() bool {
	select {
	case <-ca.exited:
		return true
	default:
		return false
	}
}

// trimLog shortens a log for an error message.
func trimLog(s string) string {
	const max = 4000
	if len(s) > max {
		return "..." + s[len(s)-max:]
	}
	return strings.TrimSpace(s)
}
