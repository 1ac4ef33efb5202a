package sds_test

import (
	"context"
	"crypto/x509"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/sds"
)

func TestDeltaSecrets(t *testing.T) {
	f := start(t, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := f.client.DeltaSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	resps := make(chan *discoveryv3.DeltaDiscoveryResponse, 8)
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				close(resps)
				return
			}
			resps <- r
		}
	}()
	next := func() *discoveryv3.DeltaDiscoveryResponse {
		t.Helper()
		select {
		case r, ok := <-resps:
			if !ok {
				t.Fatal("stream ended")
			}
			if r.Nonce == "" || r.TypeUrl != sds.SecretType {
				t.Fatalf("response without nonce or type: %v", r)
			}
			return r
		case <-time.After(10 * time.Second):
			t.Fatal("no response within 10s")
		}
		return nil
	}
	names := func(r *discoveryv3.DeltaDiscoveryResponse) map[string]string {
		out := map[string]string{}
		for _, res := range r.Resources {
			var sec tlsv3.Secret
			if err := res.Resource.UnmarshalTo(&sec); err != nil {
				t.Fatal(err)
			}
			if err := sec.Validate(); err != nil {
				t.Fatal(err)
			}
			if sec.Name != res.Name || res.Version == "" {
				t.Fatalf("resource %s carries secret %s, version %q", res.Name, sec.Name, res.Version)
			}
			out[res.Name] = res.Version
		}
		return out
	}

	// Subscribe to both; both arrive (the workload's once it is issued).
	stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "sidecar~a"}, TypeUrl: sds.SecretType,
		ResourceNamesSubscribe: []string{sds.WorkloadCertName, sds.RootCertName}})
	got := map[string]string{}
	for len(got) < 2 {
		r := next()
		for n, v := range names(r) {
			got[n] = v
		}
		stream.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretType, ResponseNonce: r.Nonce})
	}

	// A bundle change sends ROOTCA only.
	f.bundle.Set([]*x509.Certificate{f.ca.Root(), catest.New(t).Root()})
	r := next()
	changed := names(r)
	if len(changed) != 1 || changed[sds.RootCertName] == "" || changed[sds.RootCertName] == got[sds.RootCertName] {
		t.Fatalf("after a bundle change got %v, want only a new ROOTCA", changed)
	}

	// A reconnecting proxy that already holds the current versions gets
	// nothing until something changes.
	cancel()
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	again, err := f.client.DeltaSecrets(ctx2)
	if err != nil {
		t.Fatal(err)
	}
	again.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretType, ResourceNamesSubscribe: []string{sds.RootCertName},
		InitialResourceVersions: map[string]string{sds.RootCertName: changed[sds.RootCertName]}})
	recv := make(chan error, 1)
	go func() { _, err := again.Recv(); recv <- err }()
	select {
	case err := <-recv:
		t.Fatalf("resent a resource the proxy holds (err %v)", err)
	case <-time.After(200 * time.Millisecond): // an answer would come in microseconds
	}
	f.bundle.Set([]*x509.Certificate{f.ca.Root()})
	select {
	case err := <-recv:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("bundle change not pushed on the reconnected stream")
	}

	// Unknown names are refused.
	bad, _ := f.client.DeltaSecrets(context.Background())
	bad.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: sds.SecretType, ResourceNamesSubscribe: []string{"nope"}})
	if _, err := bad.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("unknown name: %v, want InvalidArgument", err)
	}
}
