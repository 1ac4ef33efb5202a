package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/satoken"
	"github.com/meshid/meshid/sds"
)

// mesh is the second half of the demo: meshid-agent in node mode serving two
// workloads, one over SDS (as Envoy would), one through go-spiffe's
// Workload API client, talking mTLS through rotations.
type mesh struct {
	dir, binDir, caAddr, rootFile, jwksPath string
	adminAddr                               string
	issuer                                  *satoken.Issuer
	certTTL, duration                       time.Duration
	stay                                    bool // keep meshid-ca and meshid-agent running until Ctrl-C
}

var (
	apiID = spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/api")
	webID = spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/web")
)

func (m *mesh) run(ctx context.Context) error {
	socket := filepath.Join(m.dir, "agent.sock")
	step("starting meshid-agent in node mode (one agent for every workload on this machine)")
	info("socket %s serves Envoy SDS and the SPIFFE Workload API; each stream's token says who it is", socket)
	info("certificates live %s, so rotations come every ~%s", m.certTTL, m.certTTL/2)
	logPath := filepath.Join(m.dir, "meshid-agent.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.Command(filepath.Join(m.binDir, "meshid-agent"), "--mode=node",
		"--auth=jwks", "--jwks-file="+m.jwksPath, "--token-issuer="+issuerURL,
		"--ca-addr="+m.caAddr, "--ca-server-name=localhost", "--ca-root-file="+m.rootFile,
		"--jwt-bundle-file="+filepath.Join(filepath.Dir(filepath.Dir(m.rootFile)), "jwt-bundle.json"),
		"--sds-socket="+socket, "--socket-mode=0600", "--http-addr=127.0.0.1:0",
		"--cert-ttl="+m.certTTL.String(), "--log-format=text")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	diesWithUs(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting meshid-agent: %w", err)
	}
	defer func() {
		step("stopping meshid-agent")
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		info("stopped; its log is in %s", logPath)
	}()

	token := func(sa string) string {
		tok, err := m.issuer.Token(satoken.Claims{Namespace: "demo", ServiceAccount: sa, PodName: sa + "-0", Audiences: []string{"istio-ca"}})
		if err != nil {
			panic(err)
		}
		return tok
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Workload "api": gets its certificate and roots over SDS, as Envoy does.
	step("workload demo/api gets its certificate over SDS (like Envoy) and listens for mTLS")
	api, err := newSDSWorkload(ctx, socket, token("api"))
	if err != nil {
		return err
	}
	defer api.close()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", api.serverConfig(webID))
	if err != nil {
		return err
	}
	defer lis.Close()
	go serveEcho(lis)
	info("api serves on %s and accepts only %s", lis.Addr(), webID)

	// Workload "web": go-spiffe's own Workload API client, with its token.
	step("workload demo/web gets its certificate through go-spiffe's Workload API client")
	web, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr("unix://"+socket),
		workloadapi.WithDialOptions(grpc.WithPerRPCCredentials(bearer(token("web"))))))
	if err != nil {
		return fmt.Errorf("web's X509Source: %w", err)
	}
	defer web.Close()
	svid, _ := web.GetX509SVID()
	info("web holds %s, serial %x", svid.ID, svid.Certificates[0].SerialNumber)

	webConfig := tlsconfig.MTLSClientConfig(web, web, tlsconfig.AuthorizeID(apiID))
	long, err := tls.Dial("tcp", lis.Addr().String(), webConfig)
	if err != nil {
		return fmt.Errorf("web → api: %w", err)
	}
	defer long.Close()
	info("web → api: mTLS up, each side checked the other's SPIFFE ID")

	step("rotations, while one connection stays open and new ones are made (Ctrl-C to stop early)")
	deadline := time.After(m.duration)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastWeb, lastAPI := serialOf(web), api.serial()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-deadline:
			if err := m.refusals(lis.Addr().String(), socket, token); err != nil {
				return err
			}
			if err := m.audit(ctx, socket, token); err != nil {
				return err
			}
			if m.stay {
				m.wait(ctx, socket)
			}
			return nil
		case <-tick.C:
		}
		if err := ping(long); err != nil {
			return fmt.Errorf("the long-lived connection broke: %w", err)
		}
		conn, err := tls.Dial("tcp", lis.Addr().String(), webConfig)
		if err == nil {
			err = ping(conn)
			conn.Close()
		}
		if err != nil {
			// Say whether a certificate had lapsed: with certificates of
			// seconds, an agent starved of CPU for about half a lifetime
			// renews too late.
			return fmt.Errorf("a new connection failed at %s (web's certificate valid until %s, api's until %s; see %s): %w",
				time.Now().Format(time.StampMilli), notAfterOf(web), api.notAfter(), logPath, err)
		}
		w, a := serialOf(web), api.serial()
		msg := "ok: long-lived connection alive, new connection verified"
		if w != lastWeb {
			msg += fmt.Sprintf("; web rotated → serial %.8s…", w)
		}
		if a != lastAPI {
			msg += fmt.Sprintf("; api rotated → serial %.8s…", a)
		}
		info("%s %s", time.Now().Format(time.TimeOnly), msg)
		lastWeb, lastAPI = w, a
	}
}

// refusals shows the clients api must turn away.
func (m *mesh) refusals(addr, socket string, token func(string) string) error {
	step("a client with no certificate")
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // it cannot verify api either: it is a stranger
	if err == nil {
		err = ping(conn)
		conn.Close()
	}
	if err == nil {
		return errors.New("api accepted a client without a certificate")
	}
	info("refused: %v", err)

	step("a client with a valid certificate for the wrong identity (demo/admin)")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	admin, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr("unix://"+socket),
		workloadapi.WithDialOptions(grpc.WithPerRPCCredentials(bearer(token("admin"))))))
	if err != nil {
		return err
	}
	defer admin.Close()
	conn, err = tls.Dial("tcp", addr, tlsconfig.MTLSClientConfig(admin, admin, tlsconfig.AuthorizeID(apiID)))
	if err == nil {
		err = ping(conn)
		conn.Close()
	}
	if err == nil {
		return errors.New("api accepted demo/admin")
	}
	info("refused: %v", err)
	return nil
}

func notAfterOf(src *workloadapi.X509Source) string {
	svid, err := src.GetX509SVID()
	if err != nil {
		return "none"
	}
	return svid.Certificates[0].NotAfter.Format(time.StampMilli)
}

func serialOf(src *workloadapi.X509Source) string {
	svid, err := src.GetX509SVID()
	if err != nil {
		return ""
	}
	return svid.Certificates[0].SerialNumber.Text(16)
}

func serveEcho(lis net.Listener) {
	for {
		conn, err := lis.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(time.Minute))
			io.Copy(conn, conn)
		}()
	}
}

func ping(conn net.Conn) error {
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	if string(buf) != "ping" {
		return fmt.Errorf("echo returned %q", buf)
	}
	return nil
}

// bearer sends a token on every call, as Envoy's file-based call credentials do.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false } // a Unix socket on this machine

// sdsWorkload keeps the latest "default" and "ROOTCA" secrets from SDS
// streams, ACKing each response as Envoy does.
type sdsWorkload struct {
	mu    sync.Mutex
	cert  *tls.Certificate
	roots []*x509.Certificate
	conn  *grpc.ClientConn
}

func newSDSWorkload(ctx context.Context, socket, token string) (*sdsWorkload, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	w := &sdsWorkload{conn: conn}
	client := secretv3.NewSecretDiscoveryServiceClient(conn)
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	ready := make(chan struct{}, 2)
	for _, name := range []string{sds.WorkloadCertName, sds.RootCertName} {
		go w.follow(ctx, client, name, ready)
	}
	for range 2 {
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(30 * time.Second):
			return nil, errors.New("no secrets over SDS after 30s")
		}
	}
	return w, nil
}

func (w *sdsWorkload) follow(ctx context.Context, client secretv3.SecretDiscoveryServiceClient, name string, ready chan<- struct{}) {
	first := true
	for ctx.Err() == nil {
		stream, err := client.StreamSecrets(ctx, grpc.WaitForReady(true))
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond): // reconnect delay
			}
			continue
		}
		stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~127.0.0.1~api-0.demo~demo.svc.cluster.local"}, ResourceNames: []string{name}, TypeUrl: sds.SecretType})
		for {
			resp, err := stream.Recv()
			if err != nil {
				break
			}
			var sec tlsv3.Secret
			if err := resp.Resources[0].UnmarshalTo(&sec); err != nil {
				break
			}
			w.update(&sec)
			stream.Send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: []string{name}, TypeUrl: sds.SecretType})
			if first {
				ready <- struct{}{}
				first = false
			}
		}
	}
}

func (w *sdsWorkload) update(sec *tlsv3.Secret) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if tc := sec.GetTlsCertificate(); tc != nil {
		if pair, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes()); err == nil {
			w.cert = &pair
		}
	}
	if vc := sec.GetValidationContext(); vc != nil {
		if roots, err := ca.ParseCertificatesPEM(vc.GetTrustedCa().GetInlineBytes()); err == nil {
			w.roots = roots
		}
	}
}

func (w *sdsWorkload) notAfter() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cert.Leaf.NotAfter.Format(time.StampMilli)
}

func (w *sdsWorkload) serial() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cert.Leaf.SerialNumber.Text(16)
}

// serverConfig serves the latest certificate and accepts only peer, checked
// against the latest roots, as Envoy with an ISTIO_MUTUAL-style config does.
func (w *sdsWorkload) serverConfig(peer spiffeid.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			w.mu.Lock()
			defer w.mu.Unlock()
			return w.cert, nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var chain []*x509.Certificate
			for _, der := range raw {
				c, err := x509.ParseCertificate(der)
				if err != nil {
					return err
				}
				chain = append(chain, c)
			}
			w.mu.Lock()
			roots := w.roots
			w.mu.Unlock()
			id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(peer.TrustDomain(), roots))
			if err != nil {
				return err
			}
			if id != peer {
				return fmt.Errorf("peer is %s, only %s is allowed", id, peer)
			}
			return nil
		},
	}
}

func (w *sdsWorkload) close() { w.conn.Close() }
