package server

import (
	"crypto/tls"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	pb "istio.io/api/security/v1alpha1"
)

const streamWorkers = 64

// DefaultMaxMessageBytes bounds a gRPC request. A CSR is under 2 KiB.
const DefaultMaxMessageBytes = 64 << 10

// MaxHeaderListBytes bounds the metadata of one request (the admin API and
// the agent's sockets have the same bound).
const MaxHeaderListBytes = 64 << 10

// NewGRPCServer serves svc and the gRPC health service. With tlsConfig nil
// it serves plaintext. The health service reports NOT_SERVING until the
// caller calls SetServingStatus.
// KeepaliveEnforcement lets clients ping as often as meshid-agent does
// (agent.CAKeepalive, every 10 s, even between requests) to find dead
// connections; grpc-go's default would answer such pings with GOAWAY.
var KeepaliveEnforcement = keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}

func NewGRPCServer(svc *CertificateService, tlsConfig *tls.Config, maxMessageBytes int) (*grpc.Server, *health.Server) {
	if maxMessageBytes <= 0 {
		maxMessageBytes = DefaultMaxMessageBytes
	}
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxMessageBytes),
		// A request carries a token of at most 16 KiB and a few short
		// headers; grpc-go would take 16 MiB of them.
		grpc.MaxHeaderListSize(MaxHeaderListBytes),
		grpc.MaxConcurrentStreams(1024),
		// Reused handler goroutines keep the stacks the signing path has
		// grown, instead of growing a fresh one for every request. Streams
		// beyond the pool get a new goroutine, so the pool is sized for
		// typical concurrency (64 in flight: +5% throughput over 8 workers
		// on 2 cores, docs/performance.md), not as a limit.
		grpc.NumStreamWorkers(streamWorkers),
		grpc.SharedWriteBuffer(true),
		grpc.KeepaliveEnforcementPolicy(KeepaliveEnforcement),
	}
	if tlsConfig != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(tlsConfig)))
	}
	srv := grpc.NewServer(opts...)
	pb.RegisterIstioCertificateServiceServer(srv, svc)
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	hs.SetServingStatus(pb.IstioCertificateService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	return srv, hs
}

// SetServing flips the health service of a server made by NewGRPCServer.
func SetServing(hs *health.Server, serving bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	hs.SetServingStatus("", st)
	hs.SetServingStatus(pb.IstioCertificateService_ServiceDesc.ServiceName, st)
}

// TLSConfig serves the CA's own certificate over TLS 1.2 or later.
func TLSConfig(cert *ServingCertificate) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: cert.GetCertificate,
		NextProtos:     []string{"h2"},
	}
}

// NewHTTPHandler serves /healthz (the process is up), /readyz (ready
// returns nil) and /metrics.
func NewHTTPHandler(gatherer prometheus.Gatherer, ready func() error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	return mux
}
