package distribute_test

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/distribute"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/server"
)

// TestBundleEndpoint: go-spiffe's own federation client fetches the trust
// domain's bundle from the endpoint, authenticating it with SPIFFE
// (https_spiffe), and gets the CA's roots; then a second root, as during a
// root rotation.
func TestBundleEndpoint(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	endpointID := spiffeid.RequireFromPath(td, "/ns/meshid-system/sa/meshid-ca")
	m, err := keys.Generate(keys.Options{TrustDomain: td.Name()})
	if err != nil {
		t.Fatal(err)
	}
	is, err := m.Issuer(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	src := &keys.Source{}
	src.Set(is)
	authority, err := ca.New(ca.Config{Issuers: src})
	if err != nil {
		t.Fatal(err)
	}
	rs := &roots{}
	rs.set(is.Roots()...)
	handler, err := federation.NewHandler(td, distribute.BundleSource{TrustDomain: td, Roots: rs.get, RefreshHint: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	serving := &server.ServingCertificate{Authority: authority, Issuers: src, ID: endpointID}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := distribute.NewEndpointServer(handler, serving.GetCertificate)
	go srv.ServeTLS(lis, "", "")
	defer srv.Close()
	url := "https://" + lis.Addr().(*net.TCPAddr).String()

	fetch := func() int {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b, err := federation.FetchBundle(ctx, td, url, federation.WithSPIFFEAuth(x509bundle.FromX509Authorities(td, is.Roots()), endpointID))
		if err != nil {
			t.Fatalf("go-spiffe's FetchBundle: %v", err)
		}
		if hint, ok := b.RefreshHint(); !ok || hint != time.Minute {
			t.Errorf("refresh hint %v, %v", hint, ok)
		}
		if !b.HasX509Authority(is.Root()) {
			t.Error("the bundle lacks the CA's root")
		}
		return len(b.X509Authorities())
	}
	if n := fetch(); n != 1 {
		t.Errorf("%d roots, want 1", n)
	}
	rs.set(is.Root(), newRoot(t))
	if n := fetch(); n != 2 {
		t.Errorf("after a second root joined: %d roots, want 2", n)
	}

	// Headers far beyond what a bundle request needs are refused before
	// the handler runs (Go's default would take a megabyte).
	insecure := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("X-Padding", strings.Repeat("a", 64<<10))
	if resp, err := insecure.Do(req); err != nil {
		t.Errorf("oversized headers: %v", err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("oversized headers: status %d, want 431", resp.StatusCode)
		}
	}

	// Expecting another endpoint ID, the client refuses the server.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	other := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	if _, err := federation.FetchBundle(ctx, td, url, federation.WithSPIFFEAuth(x509bundle.FromX509Authorities(td, is.Roots()), other)); err == nil {
		t.Error("the endpoint's SVID was accepted for another ID")
	}
}
