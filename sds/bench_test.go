package sds_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/sds"
)

// servedAt records when the agent started serving each new certificate.
type servedAt struct {
	mu sync.Mutex
	at time.Time
}

func (s *servedAt) Issued(spiffeid.ID, *agent.SVID, time.Duration) {
	s.mu.Lock()
	s.at = time.Now()
	s.mu.Unlock()
}
func (s *servedAt) Failed(spiffeid.ID, error, time.Duration) {}
func (s *servedAt) get() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.at
}

// BenchmarkRotationFanout: n proxies, each on its own connection with a
// "default" stream; one rotation must reach all of them. Reported:
// fanout-ms, from the new certificate being served to the last stream
// receiving it (ns/op also counts signing the new certificate in process).
func BenchmarkRotationFanout(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("streams=%d", n), func(b *testing.B) {
			obs := &servedAt{}
			f := start(b, time.Hour, func(c *agent.Config) { c.Observer = obs })
			received := make(chan time.Time, n)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			for range n {
				conn, err := grpc.NewClient("unix://"+f.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					b.Fatal(err)
				}
				defer conn.Close()
				stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
				if err != nil {
					b.Fatal(err)
				}
				req := &discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: "sidecar~x"}, ResourceNames: []string{sds.WorkloadCertName}, TypeUrl: sds.SecretType}
				if err := stream.Send(req); err != nil {
					b.Fatal(err)
				}
				go func() {
					for {
						resp, err := stream.Recv()
						if err != nil {
							return
						}
						received <- time.Now()
						stream.Send(&discoveryv3.DiscoveryRequest{VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce, ResourceNames: req.ResourceNames, TypeUrl: sds.SecretType})
					}
				}()
			}
			for range n {
				<-received
			}
			var fanout time.Duration
			b.ResetTimer()
			for range b.N {
				before := obs.get()
				f.manager.Renew(web)
				var last time.Time
				for range n {
					if t := <-received; t.After(last) {
						last = t
					}
				}
				served := obs.get()
				if !served.After(before) {
					b.Fatal("no new certificate was served")
				}
				fanout += last.Sub(served)
			}
			b.ReportMetric(float64(fanout.Microseconds())/1000/float64(b.N), "fanout-ms/op")
		})
	}
}

// BenchmarkFirstCertificate: a proxy opens its stream before the agent
// holds its identity (node mode); reported: after-CA-ms, from the CA's
// answer to the proxy receiving the certificate.
func BenchmarkFirstCertificate(b *testing.B) {
	f := startNode(b)
	b.ResetTimer()
	var afterCA time.Duration
	for i := range b.N {
		b.StopTimer()
		token := f.token(b, "bench", fmt.Sprintf("sa-%d", i), time.Hour)
		b.StartTimer()
		resp, _, err := f.stream(b, token)
		got := time.Now()
		if err != nil || len(resp.Resources) != 1 {
			b.Fatalf("%v %v", resp, err)
		}
		afterCA += got.Sub(f.caAnswered())
	}
	b.ReportMetric(float64(afterCA.Microseconds())/1000/float64(b.N), "after-CA-ms/op")
}
