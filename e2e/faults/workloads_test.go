package faults

import (
	"context"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/sds"
)

// workload is one simulated workload on the node: an Envoy-like SDS client
// or a go-spiffe Workload API client, with its own service account's token.
// It records every certificate it is given.
type workload struct {
	kind  string // "sds" or "workload-api"
	id    spiffeid.ID
	token string
	trust func() *x509.CertPool // the mesh's roots now: every chain must verify to one

	mu      sync.Mutex
	current *x509.Certificate
	chain   []*x509.Certificate // current's, as received
	serials []string
	wrongID []string // certificates naming another identity, or not verifying
	lapsed  map[string]time.Time
}

func (w *workload) receive(chain []*x509.Certificate) {
	cert := chain[0]
	w.mu.Lock()
	defer w.mu.Unlock()
	serial := fmt.Sprintf("%x", cert.SerialNumber)
	if w.current != nil && w.current.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		return // the same certificate again (a reconnect)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != w.id.String() {
		w.wrongID = append(w.wrongID, fmt.Sprintf("%s got %v (serial %s)", w.id, cert.URIs, serial))
	}
	if err := verifyChain(chain, w.trust()); err != nil {
		w.wrongID = append(w.wrongID, fmt.Sprintf("%s: serial %s does not verify to the mesh root: %v", w.id, serial, err))
	}
	w.current, w.chain = cert, chain
	w.serials = append(w.serials, serial)
}

// verifyChain checks that chain, leaf first, verifies to pool, at the
// leaf's own start (validity is the lapse check's business).
func verifyChain(chain []*x509.Certificate, pool *x509.CertPool) error {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: chain[0].NotBefore.Add(time.Minute), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

// check notes a lapse if what the workload holds has expired at now.
func (w *workload) check(now time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.current == nil || !now.After(w.current.NotAfter) {
		return
	}
	serial := fmt.Sprintf("%x", w.current.SerialNumber)
	if w.lapsed == nil {
		w.lapsed = map[string]time.Time{}
	}
	if _, seen := w.lapsed[serial]; !seen {
		w.lapsed[serial] = now
	}
}

// currentChain is the chain of the certificate held, nil if none.
func (w *workload) currentChain() []*x509.Certificate {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.chain
}

func (w *workload) snapshot() (serials []string, wrong []string, lapses int, current *x509.Certificate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.serials...), append([]string(nil), w.wrongID...), len(w.lapsed), w.current
}

// followSDS keeps an SDS stream open as Envoy does: asks for the workload
// certificate, ACKs each push, reconnects when the stream breaks.
func (w *workload) followSDS(ctx context.Context, socket string) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	client := secretv3.NewSecretDiscoveryServiceClient(conn)
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+w.token)
	for ctx.Err() == nil {
		stream, err := client.StreamSecrets(ctx, grpc.WaitForReady(true))
		if err != nil {
			sleep(ctx, 200*time.Millisecond) // reconnect delay, as Envoy's
			continue
		}
		req := &discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~" + w.id.Path()}, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType}
		if stream.Send(req) != nil {
			continue
		}
		for {
			resp, err := stream.Recv()
			if err != nil {
				break
			}
			var sec tlsv3.Secret
			if len(resp.Resources) == 1 && resp.Resources[0].UnmarshalTo(&sec) == nil {
				if certs, err := ca.ParseCertificatesPEM(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes()); err == nil && len(certs) > 0 {
					w.receive(certs)
				}
			}
			ack := &discoveryv3.DiscoveryRequest{VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType}
			if stream.Send(ack) != nil {
				break
			}
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

// watchWorkloadAPI follows the workload's X.509 context through go-spiffe's
// own client, which reconnects by itself.
func (w *workload) watchWorkloadAPI(ctx context.Context, socket string) {
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket),
		workloadapi.WithDialOptions(grpc.WithPerRPCCredentials(bearer(w.token))))
	if err != nil {
		panic(err)
	}
	defer client.Close()
	for ctx.Err() == nil {
		client.WatchX509Context(ctx, watcher{w})
		sleep(ctx, 200*time.Millisecond)
	}
}

type watcher struct{ w *workload }

func (v watcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	if svid := c.DefaultSVID(); svid != nil && len(svid.Certificates) > 0 {
		v.w.receive(svid.Certificates)
	}
}

func (watcher) OnX509ContextWatchError(error) {}

// bearer sends the pod's token with every call, as meshid-agent's node mode
// asks of each workload.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
