package e2e

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/sds"
)

// metrics is the agent's /metrics text ("" while it does not answer).
func (a *agentProcess) metrics() string {
	resp, err := http.Get("http://" + a.httpAddr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// metric reads one unlabelled or fully labelled series from /metrics.
func (a *agentProcess) metric(t *testing.T, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(a.metrics(), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// envoy follows "default" over SDS like Envoy: it reconnects when the
// stream ends, and reports every certificate it receives and every stream
// that ends.
type envoy struct {
	certs chan *x509.Certificate
	ended chan error
}

func followSDS(t *testing.T, socket string) *envoy {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	e := &envoy{certs: make(chan *x509.Certificate, 64), ended: make(chan error, 64)}
	client := secretv3.NewSecretDiscoveryServiceClient(conn)
	go func() {
		for ctx.Err() == nil {
			stream, err := client.StreamSecrets(ctx, grpc.WaitForReady(true))
			if err != nil {
				time.Sleep(100 * time.Millisecond) // reconnect delay
				continue
			}
			stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType})
			for {
				resp, err := stream.Recv()
				if err != nil {
					if ctx.Err() == nil {
						e.ended <- err
					}
					break
				}
				var sec tlsv3.Secret
				if resp.Resources[0].UnmarshalTo(&sec) == nil {
					if certs, err := ca.ParseCertificatesPEM(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes()); err == nil {
						e.certs <- certs[0]
					}
				}
				stream.Send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType})
			}
		}
	}()
	return e
}

func (e *envoy) next(t *testing.T, within time.Duration) *x509.Certificate {
	t.Helper()
	select {
	case c := <-e.certs:
		return c
	case <-time.After(within):
		t.Fatalf("no certificate over SDS within %s", within)
	}
	return nil
}

// TestAgentCAOutage: meshid-ca stops past the rotation point; the served
// certificate stays, no stream is closed, the failure shows in metrics, and
// the agent recovers when the CA comes back on the same address and state.
func TestAgentCAOutage(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, caArgs := jwksCAArgs(t, dir, stateDir)
	caAddr := fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
	caArgs = append(caArgs, "--grpc-addr="+caAddr)
	p := startCA(t, caArgs...)
	p.WaitReady(t, 30*time.Second)
	socket := shortSocket(t)
	a := startAgent(t, podAgentArgs(t, issuer, dir, stateDir, caAddr, socket)...)
	e := followSDS(t, socket)
	first := e.next(t, 20*time.Second)

	p.Stop(t)
	// Wait for the agent to notice: its renewal (at about 3s of 6s) fails.
	deadline := time.Now().Add(10 * time.Second)
	for a.metric(t, `meshid_agent_identities_failing`) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the agent never reported the CA failing")
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
	if time.Now().After(first.NotAfter) {
		t.Fatal("test too slow: the certificate expired before the checks")
	}
	select {
	case c := <-e.certs:
		t.Fatalf("a certificate (serial %x) was pushed while the CA was down", c.SerialNumber)
	case err := <-e.ended:
		t.Fatalf("the SDS stream was closed during the outage: %v", err)
	default:
	}
	if n := a.metric(t, `meshid_agent_ca_failures_total{code="Unavailable"}`); n < 1 {
		t.Errorf("meshid_agent_ca_failures_total{code=\"Unavailable\"} = %v", n)
	}

	restarted := startCA(t, caArgs...)
	restarted.WaitReady(t, 30*time.Second)
	renewed := e.next(t, 20*time.Second)
	if renewed.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("the same certificate was pushed again")
	}
	select {
	case err := <-e.ended:
		t.Fatalf("the SDS stream was closed: %v", err)
	default:
	}
}

// TestAgentRestart: streams reconnect to a restarted agent and get
// certificates again.
func TestAgentRestart(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	issuer, caArgs := jwksCAArgs(t, dir, stateDir)
	p := startCA(t, caArgs...)
	p.WaitReady(t, 30*time.Second)
	socket := shortSocket(t)
	args := podAgentArgs(t, issuer, dir, stateDir, p.GRPCAddr, socket)
	a := startAgent(t, args...)
	e := followSDS(t, socket)
	first := e.next(t, 20*time.Second)

	a.stop()
	select {
	case <-e.ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not end when the agent stopped")
	}
	startAgent(t, args...)
	again := e.next(t, 20*time.Second)
	if again.URIs[0].String() != first.URIs[0].String() {
		t.Fatalf("after the restart the stream got %v", again.URIs)
	}
}
