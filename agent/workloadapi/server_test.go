package workloadapi_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
	meshidwl "github.com/meshid/meshid/agent/workloadapi"
	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/sds"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// serve runs the Workload API for one pod identity with certificates of ttl.
func serve(t *testing.T, c *catest.CA, id spiffeid.ID, ttl time.Duration) string {
	t.Helper()
	return serveBundle(t, c, id, ttl, agent.NewBundle(td, []*x509.Certificate{c.Root()}))
}

func serveBundle(t *testing.T, c *catest.CA, id spiffeid.ID, ttl time.Duration, bundle *agent.Bundle) string {
	t.Helper()
	m, err := agent.NewManager(agent.Config{Signer: c, JWT: jwtMinter{c}, TTL: ttl, Backoff: agent.Backoff{Initial: 100 * time.Millisecond, Max: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	dir, err := os.MkdirTemp("", "wl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "agent.sock")
	lis, err := sds.Listen(socket, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	meshidwl.New(td, agent.Pod{Manager: m, ID: id, Tokens: agent.StaticToken(id.String())}, bundle, nil).Register(g)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return "unix://" + socket
}

// TestGoSpiffeMTLSAcrossRotation: two workloads get their certificates from
// the agent through go-spiffe's own X509Source, talk mTLS authorizing each
// other's SPIFFE ID, and keep doing so across rotations.
func TestGoSpiffeMTLSAcrossRotation(t *testing.T) {
	c := catest.New(t)
	serverID := spiffeid.RequireFromPath(td, "/ns/shop/sa/api")
	clientID := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	source := func(id spiffeid.ID) *workloadapi.X509Source {
		s, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(serve(t, c, id, 2*time.Second))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	serverSrc, clientSrc := source(serverID), source(clientID)

	lis := echoServer(t, tlsconfig.MTLSServerConfig(serverSrc, serverSrc, tlsconfig.AuthorizeID(clientID)))
	dial := func(authorize spiffeid.ID) (*tls.Conn, error) {
		return tls.Dial("tcp", lis.Addr().String(), tlsconfig.MTLSClientConfig(clientSrc, clientSrc, tlsconfig.AuthorizeID(authorize)))
	}
	// One long-lived connection, and a new one after each of two rotations.
	long, err := dial(serverID)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	first, err := clientSrc.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	for rotation := 0; rotation < 2; rotation++ {
		if err := clientSrc.WaitUntilUpdated(ctx); err != nil {
			t.Fatalf("no rotation seen by go-spiffe: %v", err)
		}
		conn, err := dial(serverID)
		if err != nil {
			t.Fatalf("handshake after rotation %d: %v", rotation+1, err)
		}
		peer := conn.ConnectionState().PeerCertificates[0]
		if peer.URIs[0].String() != serverID.String() {
			t.Errorf("peer %v", peer.URIs)
		}
		echo(t, conn)
		conn.Close()
		echo(t, long)
	}
	now, _ := clientSrc.GetX509SVID()
	if now.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) == 0 {
		t.Error("go-spiffe still holds the first certificate")
	}
	// The wrong identity is refused by the client's authorizer.
	if _, err := dial(spiffeid.RequireFromPath(td, "/ns/shop/sa/admin")); err == nil {
		t.Error("client accepted a server that is not the one it authorized")
	}
}

// echoServer listens on loopback with cfg and echoes every connection
// until the test ends.
func echoServer(t *testing.T, cfg *tls.Config) net.Listener {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(conn, conn); conn.Close() }()
		}
	}()
	return lis
}

func echo(t *testing.T, conn *tls.Conn) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q %v", buf, err)
	}
}

func TestSecurityHeaderRequired(t *testing.T) {
	addr := serve(t, catest.New(t), spiffeid.RequireFromPath(td, "/ns/shop/sa/web"), time.Hour)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := workload.NewSpiffeWorkloadAPIClient(conn)
	stream, err := client.FetchX509SVID(context.Background(), &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = stream.Recv()
	if status.Code(err) != codes.InvalidArgument || errors.Is(err, io.EOF) {
		t.Fatalf("no security header: %v, want InvalidArgument", err)
	}
}
