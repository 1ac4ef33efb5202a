// Command workload is the test workload of e2e/cluster, run in pods of the
// single-node cluster: a go-spiffe program that gets its identity from
// meshid-agent's Workload API on the node's socket, with its pod's projected
// token, as an application would.
//
//	workload serve  --listen :8443 --peer ID      mTLS server accepting only ID
//	workload call   --addr HOST:PORT --peer ID    mTLS client to ID, once a second
//	workload attack --victim-id ID ...            tries to get another pod's identity; prints what it got
//
// serve and call answer GET /status on --status with what they saw (their
// certificates, the peer's, handshakes, lapses) as JSON.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func main() {
	if len(os.Args) < 2 {
		log.Fatal("usage: workload serve|call|attack [flags]")
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	socket := fs.String("socket", "/run/meshid/socket", "meshid-agent's socket")
	tokenFile := fs.String("token-file", "/var/run/secrets/tokens/istio-token", "the pod's projected token (audience istio-ca)")
	statusAddr := fs.String("status", ":8080", "address of GET /status")
	listen := fs.String("listen", ":8443", "serve: mTLS address")
	addr := fs.String("addr", "", "call: the server's address")
	peer := fs.String("peer", "", "serve, call: the SPIFFE ID the other side must have")
	interval := fs.Duration("interval", time.Second, "call: time between connections")
	victimID := fs.String("victim-id", "", "attack: the identity to try to get")
	victimToken := fs.String("victim-token-file", "", "attack: a token of the victim's pod, deleted since")
	foreignToken := fs.String("foreign-token-file", "/var/run/secrets/kubernetes.io/serviceaccount/token", "attack: this pod's token for the API server's audience")
	fs.Parse(os.Args[2:])
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)

	creds := fileToken(*tokenFile)
	if mode == "attack" {
		attack(*socket, creds, *victimID, *victimToken, *foreignToken)
		return
	}
	peerID, err := spiffeid.FromString(*peer)
	if err != nil {
		log.Fatalf("--peer: %v", err)
	}
	ctx := context.Background()
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr("unix://"+*socket),
		workloadapi.WithDialOptions(grpc.WithPerRPCCredentials(creds))))
	if err != nil {
		log.Fatalf("X509Source: %v", err)
	}
	st := &state{}
	go st.watch(source)
	go func() {
		http.HandleFunc("/status", st.serveHTTP)
		log.Fatal(http.ListenAndServe(*statusAddr, nil))
	}()
	switch mode {
	case "serve":
		cfg := tlsconfig.MTLSServerConfig(source, source, tlsconfig.AuthorizeID(peerID))
		cfg.VerifyConnection = func(cs tls.ConnectionState) error { st.sawPeer(cs); return nil }
		lis, err := tls.Listen("tcp", *listen, cfg)
		if err != nil {
			log.Fatal(err)
		}
		log.Printf("serving mTLS on %s for %s", *listen, peerID)
		for {
			conn, err := lis.Accept()
			if err != nil {
				log.Fatal(err)
			}
			go func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				if err := conn.(*tls.Conn).Handshake(); err != nil {
					st.handshake(err)
					return
				}
				st.handshake(nil)
				io.Copy(conn, io.LimitReader(conn, 64))
			}()
		}
	case "call":
		cfg := tlsconfig.MTLSClientConfig(source, source, tlsconfig.AuthorizeID(peerID))
		cfg.VerifyConnection = func(cs tls.ConnectionState) error { st.sawPeer(cs); return nil }
		for range time.Tick(*interval) {
			st.handshake(ping(*addr, cfg))
		}
	default:
		log.Fatalf("unknown mode %q", mode)
	}
}

// ping makes one mTLS connection and echoes a line through it.
func ping(addr string, cfg *tls.Config) error {
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		return err
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	if string(buf) != "ping\n" {
		return fmt.Errorf("echo: %q", buf)
	}
	return nil
}

// Status is what GET /status answers.
type Status struct {
	ID          string      `json:"id"`
	Certs       []certSeen  `json:"certs"`      // this workload's certificates, in the order received
	PeerCerts   []certSeen  `json:"peer_certs"` // the other side's, in the order seen
	OK          int         `json:"ok"`         // handshakes (and echoes) that passed
	Failed      int         `json:"failed"`
	LastOK      time.Time   `json:"last_ok"`
	LastError   string      `json:"last_error,omitempty"`
	Errors      []string    `json:"errors,omitempty"` // the first 20 failures, with their times
	Lapses      []time.Time `json:"lapses,omitempty"` // times the current certificate was found expired
	CheckedLast time.Time   `json:"checked_last"`
}

type certSeen struct {
	ID       string    `json:"id"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	Seen     time.Time `json:"seen"`
}

type state struct {
	mu sync.Mutex
	s  Status
}

// watch records each certificate the source gets and, four times a second,
// whether the one it holds has expired: a lapse.
func (st *state) watch(source *workloadapi.X509Source) {
	for range time.Tick(250 * time.Millisecond) {
		svid, err := source.GetX509SVID()
		if err != nil {
			continue
		}
		now := time.Now()
		leaf := svid.Certificates[0]
		st.mu.Lock()
		st.s.ID = svid.ID.String()
		st.s.CheckedLast = now
		serial := fmt.Sprintf("%x", leaf.SerialNumber)
		if n := len(st.s.Certs); n == 0 || st.s.Certs[n-1].Serial != serial {
			st.s.Certs = append(st.s.Certs, certSeen{ID: svid.ID.String(), Serial: serial, NotAfter: leaf.NotAfter, Seen: now})
			log.Printf("holds %s serial %s until %s", svid.ID, serial, leaf.NotAfter.Format(time.RFC3339))
		}
		if !now.Before(leaf.NotAfter) {
			st.s.Lapses = append(st.s.Lapses, now)
		}
		st.mu.Unlock()
	}
}

func (st *state) sawPeer(cs tls.ConnectionState) {
	if len(cs.PeerCertificates) == 0 {
		return
	}
	leaf := cs.PeerCertificates[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return
	}
	serial := fmt.Sprintf("%x", leaf.SerialNumber)
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, c := range st.s.PeerCerts {
		if c.Serial == serial {
			return
		}
	}
	st.s.PeerCerts = append(st.s.PeerCerts, certSeen{ID: id.String(), Serial: serial, NotAfter: leaf.NotAfter, Seen: time.Now()})
}

func (st *state) handshake(err error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if err == nil {
		st.s.OK++
		st.s.LastOK = time.Now()
		return
	}
	st.s.Failed++
	st.s.LastError = err.Error()
	if len(st.s.Errors) < 20 {
		st.s.Errors = append(st.s.Errors, time.Now().UTC().Format(time.RFC3339Nano)+" "+err.Error())
	}
	log.Printf("handshake failed: %v", err)
}

func (st *state) serveHTTP(w http.ResponseWriter, _ *http.Request) {
	st.mu.Lock()
	defer st.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(st.s)
}

// fileToken sends the token file's content, read again for every call (the
// kubelet rewrites it before it expires), as authorization: Bearer.
type fileToken string

func (f fileToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	data, err := os.ReadFile(string(f))
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + strings.TrimSpace(string(data))}, nil
}

func (fileToken) RequireTransportSecurity() bool { return false }

type staticToken string

func (s staticToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	if s == "" {
		return nil, nil
	}
	return map[string]string{"authorization": "Bearer " + string(s)}, nil
}

func (staticToken) RequireTransportSecurity() bool { return false }

// Attempt is one line attack prints: what it tried and what it got.
type Attempt struct {
	Name string `json:"name"`
	Code string `json:"code,omitempty"` // the gRPC code of a refusal
	Err  string `json:"err,omitempty"`
	ID   string `json:"id,omitempty"` // the identity obtained, if any
}

// attack tries, over the agent's socket, to get an identity that is not its
// own, and prints one Attempt per try as a JSON line, then "done".
func attack(socket string, own credentials.PerRPCCredentials, victimID, victimTokenFile, foreignTokenFile string) {
	out := json.NewEncoder(os.Stdout)
	fetch := func(name string, creds credentials.PerRPCCredentials) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		opts := []workloadapi.ClientOption{workloadapi.WithAddr("unix://" + socket)}
		if creds != nil {
			opts = append(opts, workloadapi.WithDialOptions(grpc.WithPerRPCCredentials(creds)))
		}
		svid, err := workloadapi.FetchX509SVID(ctx, opts...)
		a := Attempt{Name: name}
		if err != nil {
			a.Err = err.Error()
			a.Code = status.Code(err).String()
			var s interface{ GRPCStatus() *status.Status }
			if errors.As(err, &s) {
				a.Code = s.GRPCStatus().Code().String()
			}
		} else {
			a.ID = svid.ID.String()
		}
		out.Encode(a)
	}
	read := func(file string) staticToken {
		data, err := os.ReadFile(file)
		if err != nil {
			log.Fatalf("reading %s: %v", file, err)
		}
		return staticToken(strings.TrimSpace(string(data)))
	}
	fetch("no-token", nil)
	fetch("api-server-audience-token", read(foreignTokenFile))
	fetch("deleted-victim-token", read(victimTokenFile))
	fetch("garbage-token", staticToken("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"))
	fetch("own-token", own)

	// SDS, as Envoy would ask, for the victim's SPIFFE ID by name.
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithPerRPCCredentials(own))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := secretv3.NewSecretDiscoveryServiceClient(conn).FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{
		TypeUrl:       "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
		ResourceNames: []string{victimID},
	})
	a := Attempt{Name: "sds-victim-name"}
	if err != nil {
		a.Code, a.Err = status.Code(err).String(), err.Error()
	} else {
		a.ID = fmt.Sprintf("%d resources", len(resp.GetResources()))
	}
	out.Encode(a)
	fmt.Println("done")
	// Stay, so that the test reads the log of a running container.
	select {}
}
