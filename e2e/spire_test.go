package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// spireBinaries are SPIRE's real server and agent, built by hack/spire.sh.
// The test is not part of the default run (the first build takes about 20
// minutes); run it with:
//
//	MESHID_SPIRE_DIR=$(hack/spire.sh) go test ./e2e -run TestSPIRE -v
func spireBinaries(t *testing.T) (server, agent string) {
	t.Helper()
	dir := os.Getenv("MESHID_SPIRE_DIR")
	if dir == "" {
		t.Skip("SPIRE interop: set MESHID_SPIRE_DIR=$(hack/spire.sh) (builds SPIRE v1.13.x from the Go module proxy, ~20 min the first time)")
	}
	server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
	for _, b := range []string{server, agent} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("MESHID_SPIRE_DIR: %v", err)
		}
	}
	return server, agent
}

// spire is a SPIRE server and one agent of trust domain spire.example, the
// agent attested by a join token, its workloads by Unix UID.
type spire struct {
	t          *testing.T
	server     string // binary
	dir        string
	serverSock string
	agentSock  string
	bundlePort int
}

const spireTD = "spire.example"

func startSPIRE(t *testing.T, serverBin, agentBin string) *spire {
	t.Helper()
	// Unix socket paths are short; t.TempDir's may not be.
	dir, err := os.MkdirTemp("", "spire")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &spire{t: t, server: serverBin, dir: dir, serverSock: filepath.Join(dir, "server.sock"), agentSock: filepath.Join(dir, "agent.sock"), bundlePort: freeTCPPort(t)}
	serverPort := freeTCPPort(t)
	mustWrite(t, filepath.Join(dir, "server.conf"), []byte(fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = "%s"
  trust_domain = "%s"
  data_dir = "%s/data"
  log_level = "INFO"
  default_x509_svid_ttl = "1h"
  federation {
    bundle_endpoint {
      address = "127.0.0.1"
      port = %d
      refresh_hint = "10s"
      profile "https_spiffe" {}
    }
  }
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "%s/data/datastore.sqlite3"
    }
  }
  KeyManager "disk" {
    plugin_data { keys_path = "%s/data/keys.json" }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`, serverPort, s.serverSock, spireTD, dir, s.bundlePort, dir, dir)), 0o600)
	runDaemon(t, "spire-server", serverBin, "run", "-config", filepath.Join(dir, "server.conf"))
	waitUntil(t, 60*time.Second, "spire-server healthy", func() bool {
		return exec.Command(serverBin, "healthcheck", "-socketPath", s.serverSock).Run() == nil
	})

	mustWrite(t, filepath.Join(dir, "bootstrap.crt"), []byte(s.cli("bundle", "show")), 0o600)
	token := strings.TrimPrefix(strings.TrimSpace(s.cli("token", "generate", "-spiffeID", "spiffe://"+spireTD+"/node1")), "Token: ")
	mustWrite(t, filepath.Join(dir, "agent.conf"), []byte(fmt.Sprintf(`agent {
  data_dir = "%s/agent"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = "%s"
  trust_bundle_path = "%s/bootstrap.crt"
  trust_domain = "%s"
}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data { directory = "%s/agent" }
  }
  WorkloadAttestor "unix" {
    plugin_data {}
  }
}
`, dir, serverPort, s.agentSock, dir, spireTD, dir)), 0o600)
	runDaemon(t, "spire-agent", agentBin, "run", "-config", filepath.Join(dir, "agent.conf"), "-joinToken", token)
	waitUntil(t, 60*time.Second, "spire-agent healthy", func() bool {
		return exec.Command(agentBin, "healthcheck", "-socketPath", s.agentSock).Run() == nil
	})
	return s
}

// cli runs a spire-server command against the server and returns its
// output, failing the test if it fails.
func (s *spire) cli(args ...string) string {
	s.t.Helper()
	args = append(args, "-socketPath", s.serverSock)
	out, err := exec.Command(s.server, args...).CombinedOutput()
	if err != nil {
		s.t.Fatalf("spire-server %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// runDaemon starts a long-running process, stopped when the test ends; its
// output is shown if the test fails.
func runDaemon(t *testing.T, name, bin string, args ...string) {
	t.Helper()
	var out lockedBuffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("%s log:\n%s", name, out.String())
		}
	})
}

// TestSPIRE: meshid and a real SPIRE server federate both ways over their
// SPIFFE bundle endpoints (https_spiffe). A workload with a SPIRE SVID and
// one with a meshid SVID, each through go-spiffe's Workload API client of
// its own agent, talk mTLS, each side accepting the other only once its
// own trust domain federates with the other's; a meshid JWT-SVID validates
// on SPIRE's agent and a SPIRE JWT-SVID on meshid's; a federation removed
// from meshid stops being trusted there.
func TestSPIRE(t *testing.T) {
	serverBin, agentBin := spireBinaries(t)
	s := startSPIRE(t, serverBin, agentBin)
	uid := fmt.Sprint(os.Getuid())
	spireID := spiffeid.RequireFromString("spiffe://" + spireTD + "/api")
	meshID := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	entry := func(verb string, extra ...string) string {
		return s.cli(append([]string{"entry", verb, "-parentID", "spiffe://" + spireTD + "/node1", "-spiffeID", spireID.String(), "-selector", "unix:uid:" + uid}, extra...)...)
	}
	// Not federated yet on SPIRE's side.
	created := entry("create")
	entryID := ""
	for _, line := range strings.Split(created, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "Entry ID" {
			entryID = strings.TrimSpace(v)
		}
	}
	if entryID == "" {
		t.Fatalf("no entry ID in %q", created)
	}

	// meshid-ca federates with spire.example from the start.
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	spireBundle := s.cli("bundle", "show", "-format", "spiffe")
	federation := filepath.Join(dir, "federation.yaml")
	mustWrite(t, federation, []byte(fmt.Sprintf(`federatesWith:
- trustDomain: %s
  bundleEndpointURL: https://127.0.0.1:%d
  bundleEndpointProfile:
    type: https_spiffe
    endpointSPIFFEID: spiffe://%s/spire/server
  trustDomainBundle: '%s'
`, spireTD, s.bundlePort, spireTD, strings.ReplaceAll(strings.TrimSpace(spireBundle), "\n", ""))), 0o644)
	issuer, caArgs := jwksCAArgs(t, dir, state)
	meshBundlePort := freeTCPPort(t)
	caArgs = append(caArgs, fmt.Sprintf("--bundle-endpoint-addr=127.0.0.1:%d", meshBundlePort))
	ca := startCA(t, append(caArgs, "--federation-file="+federation)...)
	ca.WaitReady(t, 30*time.Second)

	socket := shortSocket(t)
	agentArgs := append(podAgentArgs(t, issuer, dir, state, ca.GRPCAddr, socket),
		"--cert-ttl=1h",
		"--federated-bundles-file="+filepath.Join(state, "federated-bundles.json"),
		"--jwt-bundle-file="+filepath.Join(state, "jwt-bundle.json"))
	startAgent(t, agentArgs...)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	meshSrc, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
	if err != nil {
		t.Fatal(err)
	}
	defer meshSrc.Close()
	meshClient, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		t.Fatal(err)
	}
	defer meshClient.Close()
	spireSrc, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+s.agentSock)))
	if err != nil {
		t.Fatal(err)
	}
	defer spireSrc.Close()
	spireClient, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+s.agentSock))
	if err != nil {
		t.Fatal(err)
	}
	defer spireClient.Close()
	waitUntil(t, 90*time.Second, "the SPIRE workload's SVID", func() bool {
		svid, err := spireSrc.GetX509SVID()
		return err == nil && svid.ID == spireID
	})
	spireTrustDomain := spiffeid.RequireTrustDomainFromString(spireTD)
	waitUntil(t, 60*time.Second, "spire.example's bundle at the meshid workload", func() bool {
		_, err := meshSrc.GetX509BundleForTrustDomain(spireTrustDomain)
		return err == nil
	})

	// mTLS both ways: a meshid server and a SPIRE server, each called by
	// the other side's workload.
	meshServer := tlsServer(t, tlsconfig.MTLSServerConfig(meshSrc, meshSrc, tlsconfig.AuthorizeID(spireID)))
	spireServer := tlsServer(t, tlsconfig.MTLSServerConfig(spireSrc, spireSrc, tlsconfig.AuthorizeID(meshID)))
	meshToSPIRE := func() error {
		return tlsCall(spireServer.addr, tlsconfig.MTLSClientConfig(meshSrc, meshSrc, tlsconfig.AuthorizeID(spireID)))
	}
	spireToMesh := func() error {
		return tlsCall(meshServer.addr, tlsconfig.MTLSClientConfig(spireSrc, spireSrc, tlsconfig.AuthorizeID(meshID)))
	}

	// Only meshid federates so far: SPIRE's side refuses meshid's workload.
	if err := meshToSPIRE(); err == nil {
		t.Fatal("the SPIRE workload accepted a meshid client before SPIRE federated with cluster.local")
	}
	if err := spireToMesh(); err == nil {
		t.Fatal("a meshid server handshake with a SPIRE client that cannot verify it succeeded")
	}
	// JWT: SPIRE's tokens validate at meshid (federated), meshid's are
	// refused at SPIRE (not yet).
	spireJWT, err := spireClient.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "meshid-api"})
	if err != nil {
		t.Fatal(err)
	}
	meshJWT, err := meshClient.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "spire-api"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := meshClient.ValidateJWTSVID(ctx, spireJWT.Marshal(), "meshid-api"); err != nil || got.ID != spireID {
		t.Errorf("meshid's agent on SPIRE's JWT-SVID: %v, %v", got, err)
	}
	if _, err := spireClient.ValidateJWTSVID(ctx, meshJWT.Marshal(), "spire-api"); err == nil {
		t.Error("SPIRE's agent took meshid's JWT-SVID before federating with cluster.local")
	}

	// SPIRE federates with meshid's bundle endpoint, and the entry
	// federates with cluster.local.
	meshBootstrap, err := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("cluster.local"), readRoots(t, filepath.Join(state, "ca", "root-cert.pem"))).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	bootstrapPath := filepath.Join(s.dir, "meshid-bundle.json")
	mustWrite(t, bootstrapPath, meshBootstrap, 0o600)
	s.cli("federation", "create", "-trustDomain", "cluster.local",
		"-bundleEndpointURL", fmt.Sprintf("https://127.0.0.1:%d", meshBundlePort),
		"-bundleEndpointProfile", "https_spiffe", "-endpointSpiffeID", "spiffe://cluster.local/ns/meshid-system/sa/meshid-ca",
		"-trustDomainBundlePath", bootstrapPath, "-trustDomainBundleFormat", "spiffe")
	s.cli("federation", "refresh", "-id", "cluster.local")
	entry("update", "-entryID", entryID, "-federatesWith", "spiffe://cluster.local")
	meshTD := spiffeid.RequireTrustDomainFromString("cluster.local")
	waitUntil(t, 90*time.Second, "cluster.local's bundle, with meshid's JWT keys, at the SPIRE workload", func() bool {
		b, err := spireClient.FetchJWTBundles(ctx)
		if err != nil {
			return false
		}
		jb, err := b.GetJWTBundleForTrustDomain(meshTD)
		_, x509err := spireSrc.GetX509BundleForTrustDomain(meshTD)
		return err == nil && len(jb.JWTAuthorities()) > 0 && x509err == nil
	})
	if err := meshToSPIRE(); err != nil {
		t.Errorf("meshid → SPIRE over mTLS, federated both ways: %v", err)
	}
	if err := spireToMesh(); err != nil {
		t.Errorf("SPIRE → meshid over mTLS, federated both ways: %v", err)
	}
	if got, err := spireClient.ValidateJWTSVID(ctx, meshJWT.Marshal(), "spire-api"); err != nil || got.ID != meshID {
		t.Errorf("SPIRE's agent on meshid's JWT-SVID: %v, %v", got, err)
	}
	if _, err := spireClient.ValidateJWTSVID(ctx, meshJWT.Marshal(), "other"); err == nil {
		t.Error("SPIRE's agent took meshid's JWT-SVID for another audience")
	}

	// meshid stops federating (restarted without the federation): its
	// workloads stop trusting spire.example.
	ca.Stop(t)
	ca = startCA(t, caArgs...)
	ca.WaitReady(t, 30*time.Second)
	waitUntil(t, 60*time.Second, "spire.example gone from the meshid workload", func() bool {
		_, err := meshSrc.GetX509BundleForTrustDomain(spireTrustDomain)
		return err != nil
	})
	if err := meshToSPIRE(); err == nil {
		t.Error("meshid's workload still trusts SPIRE's server after the federation was removed")
	}
	if _, err := meshClient.ValidateJWTSVID(ctx, spireJWT.Marshal(), "meshid-api"); err == nil {
		t.Error("meshid's agent still takes SPIRE's JWT-SVID after the federation was removed")
	}
}

// tlsServ answers each connection with one line once its handshake is
// done.
type tlsServ struct{ addr string }

func tlsServer(t *testing.T, cfg *tls.Config) *tlsServ {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { lis.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				if err := conn.(*tls.Conn).Handshake(); err != nil {
					return
				}
				io.WriteString(conn, "hello\n")
			})
		}
	})
	return &tlsServ{addr: lis.Addr().String()}
}

// tlsCall dials addr and reads the server's line: the handshake succeeded
// on both sides (TLS 1.3 clients finish before the server checks them).
func tlsCall(addr string, cfg *tls.Config) error {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := io.ReadAll(io.LimitReader(conn, 6))
	if err != nil {
		return err
	}
	if !bytes.Equal(line, []byte("hello\n")) {
		return fmt.Errorf("server answered %q", line)
	}
	return nil
}
