package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/meshid/sds"
)

// floorEnv names the socket and HTTP address ("socket,addr") on which the
// e2e test binary, started again as a child, serves the gRPC floor instead
// of running tests.
const floorEnv = "MESHID_E2E_SDS_FLOOR"

// serveSDSFloor is the least an SDS server over gRPC can hold per proxy:
// meshid-agent's gRPC settings, one canned secret of the size of a
// workload certificate, and a handler that only reads its stream. The
// memory benchmark measures it beside meshid-agent, in the same run, so
// the agent's own cost per identity can be told from gRPC's per
// connection.
func serveSDSFloor(socket, httpAddr string) error {
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	go http.ListenAndServe(httpAddr, promhttp.Handler()) // Go's memory metrics, as the agent's /metrics has them
	g := grpc.NewServer(sds.ServerOptions()...)
	secretv3.RegisterSecretDiscoveryServiceServer(g, floorSDS{})
	fmt.Fprintln(os.Stderr, "floor: serving")
	return g.Serve(lis)
}

type floorSDS struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
}

var floorSecret, _ = anypb.New(&tlsv3.Secret{Name: sds.WorkloadCertName, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
	CertificateChain: inlineBytes(make([]byte, 1400)),
	PrivateKey:       inlineBytes(make([]byte, 240)),
}}})

func (floorSDS) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	for n := 0; ; n++ {
		if _, err := stream.Recv(); err != nil {
			return nil
		}
		if n == 0 {
			if err := stream.Send(&discoveryv3.DiscoveryResponse{VersionInfo: "1", Nonce: "1", TypeUrl: sds.SecretType, Resources: []*anypb.Any{floorSecret}}); err != nil {
				return err
			}
		}
	}
}

func inlineBytes(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}
