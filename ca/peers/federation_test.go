package peers

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
)

var (
	own  = spiffeid.RequireTrustDomainFromString("cluster.local")
	peer = spiffeid.RequireTrustDomainFromString("peer.example")
)

func TestParseConfig(t *testing.T) {
	m := peerCA(t)
	doc := bundleDoc(t, spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert}))
	good := `
federatesWith:
- trustDomain: peer.example
  bundleEndpointURL: https://peer.example:8443
  bundleEndpointProfile:
    type: https_spiffe
    endpointSPIFFEID: spiffe://peer.example/spire/server
  trustDomainBundle: '` + doc + `'
- trustDomain: web.example
  bundleEndpointURL: https://web.example/bundle
  bundleEndpointProfile:
    type: https_web
`
	peers, err := ParseConfig([]byte(good), own)
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 2 || peers[0].Profile != HTTPSSPIFFE || peers[0].EndpointID.String() != "spiffe://peer.example/spire/server" || peers[0].Bootstrap == nil || peers[1].Profile != HTTPSWeb {
		t.Fatalf("parsed %+v", peers)
	}
	for _, tc := range []struct{ name, doc, want string }{
		{"own trust domain", "federatesWith:\n- trustDomain: cluster.local\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https_web}\n", "own trust domain"},
		{"twice", "federatesWith:\n- trustDomain: a.example\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https_web}\n- trustDomain: a.example\n  bundleEndpointURL: https://y\n  bundleEndpointProfile: {type: https_web}\n", "listed twice"},
		{"plain http", "federatesWith:\n- trustDomain: a.example\n  bundleEndpointURL: http://x\n  bundleEndpointProfile: {type: https_web}\n", "https://"},
		{"profile", "federatesWith:\n- trustDomain: a.example\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https}\n", "want https_web or https_spiffe"},
		{"no bootstrap", "federatesWith:\n- trustDomain: a.example\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https_spiffe, endpointSPIFFEID: 'spiffe://a.example/s'}\n", "needs trustDomainBundle"},
		{"endpoint elsewhere", "federatesWith:\n- trustDomain: a.example\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https_spiffe, endpointSPIFFEID: 'spiffe://b.example/s'}\n  trustDomainBundle: '" + doc + "'\n", "is not in a.example"},
		{"unknown field", "federatesWith:\n- trustDomain: a.example\n  endpointURL: https://x\n", "unknown field"},
	} {
		if _, err := ParseConfig([]byte(tc.doc), own); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
}

// endpoint is a peer's SPIFFE bundle endpoint (https_spiffe) on loopback,
// serving what bundle is set to.
type endpoint struct {
	url string
	mu  sync.Mutex
	doc []byte
}

func (e *endpoint) set(doc []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.doc = doc
}

func newEndpoint(t *testing.T, m *keys.Material, id spiffeid.ID) *endpoint {
	t.Helper()
	e := &endpoint{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		e.mu.Lock()
		defer e.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write(e.doc)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{svid(t, m, id)}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshakes refused on purpose
	srv.StartTLS()
	t.Cleanup(srv.Close)
	e.url = srv.URL
	return e
}

func TestSetFollowsAPeer(t *testing.T) {
	m := peerCA(t)
	endpointID := spiffeid.RequireFromPath(peer, "/bundle-endpoint")
	ep := newEndpoint(t, m, endpointID)
	first := spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert})
	first.SetSequenceNumber(1)
	first.SetRefreshHint(time.Second)
	ep.set(mustMarshal(t, first))

	reg := prometheus.NewRegistry()
	p := Peer{TrustDomain: peer, URL: ep.url, Profile: HTTPSSPIFFE, EndpointID: endpointID, Bootstrap: spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert})}
	s, err := NewSet(Config{Peers: []Peer{p}, MinRefresh: 100 * time.Millisecond, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	waitFor(t, "the first fetch", func() bool { st := s.Status(time.Now())[0]; return st.From == "endpoint" && !st.Stale })

	// A new root joins: taken at the next refresh.
	other := peerCA(t)
	second := spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert, other.RootCert})
	second.SetSequenceNumber(2)
	second.SetRefreshHint(time.Second)
	ep.set(mustMarshal(t, second))
	waitFor(t, "the second bundle", func() bool { b, _ := s.GetBundleForTrustDomain(peer); return len(b.X509Authorities()) == 2 })

	// Rolled back to sequence 1: refused, the newer kept.
	ep.set(mustMarshal(t, first))
	waitFor(t, "the rollback refused", func() bool {
		return testutil.ToFloat64(s.fetches.WithLabelValues(peer.String(), "refused")) > 0
	})
	if b, _ := s.GetBundleForTrustDomain(peer); len(b.X509Authorities()) != 2 {
		t.Error("an older bundle replaced a newer one")
	}
	if st := s.Status(time.Now())[0]; st.LastError == nil || !strings.Contains(st.LastError.Error(), "older than") {
		t.Errorf("last error %v, want the rollback's", st.LastError)
	}
	// A peer bundle is never ours.
	if _, err := s.GetBundleForTrustDomain(own); err == nil {
		t.Error("the Set answered for this CA's own trust domain")
	}
	if n, err := testutil.GatherAndCount(reg, "meshid_ca_federated_bundle_age_seconds", "meshid_ca_federated_bundle_stale"); err != nil || n != 2 {
		t.Errorf("%d age and stale series (%v), want 2", n, err)
	}
}

func TestFetchRefuses(t *testing.T) {
	m := peerCA(t)
	endpointID := spiffeid.RequireFromPath(peer, "/bundle-endpoint")
	ep := newEndpoint(t, m, endpointID)
	good := mustMarshal(t, spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert}))
	trust := spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert})
	p := Peer{TrustDomain: peer, URL: ep.url, Profile: HTTPSSPIFFE, EndpointID: endpointID}
	for _, tc := range []struct {
		name string
		doc  []byte
		peer func(Peer) Peer
		want string
	}{
		{"another endpoint ID", good, func(p Peer) Peer { p.EndpointID = spiffeid.RequireFromPath(peer, "/other"); return p }, "unexpected ID"},
		{"another trust domain's CA", good, func(p Peer) Peer { return p }, "unknown authority"},
		{"too large", []byte(`{"keys":[` + strings.Repeat(" ", MaxBundleBytes) + `]}`), func(p Peer) Peer { return p }, "larger than"},
		{"no X.509 authority", []byte(`{"keys":[]}`), func(p Peer) Peer { return p }, "no X.509 authority"},
		{"not JSON", []byte(`<html>`), func(p Peer) Peer { return p }, "bundle"},
	} {
		ep.set(tc.doc)
		tr := trust
		if tc.name == "another trust domain's CA" {
			tr = spiffebundle.FromX509Authorities(peer, []*x509.Certificate{peerCA(t).RootCert})
		}
		_, err := Fetch(context.Background(), tc.peer(p), tr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
	ep.set(good)
	if _, err := Fetch(context.Background(), p, trust); err != nil {
		t.Errorf("the good bundle: %v", err)
	}
}

// The last good bundle outlives the process: a new Set whose peer's
// endpoint is gone starts from what another stored, marked stale.
func TestConfigMapStoreKeepsTheLastGood(t *testing.T) {
	c := kubetest.Start(t)
	c.ServiceAccount(t, "meshid-system", "meshid-ca")
	store := &ConfigMapStore{Client: c.Client.CoreV1(), Namespace: "meshid-system", Name: "meshid-federated-bundles"}
	m := peerCA(t)
	endpointID := spiffeid.RequireFromPath(peer, "/bundle-endpoint")
	ep := newEndpoint(t, m, endpointID)
	b := spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert, peerCA(t).RootCert})
	b.SetSequenceNumber(7)
	ep.set(mustMarshal(t, b))
	p := Peer{TrustDomain: peer, URL: ep.url, Profile: HTTPSSPIFFE, EndpointID: endpointID, Bootstrap: spiffebundle.FromX509Authorities(peer, []*x509.Certificate{m.RootCert})}

	run := func(p Peer, until func(*Set) bool, what string) *Set {
		s, err := NewSet(Config{Peers: []Peer{p}, Store: store, MinRefresh: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); s.Run(ctx) }()
		defer func() { cancel(); <-done }()
		waitFor(t, what, func() bool { return until(s) })
		return s
	}
	// A federation removed from the configuration since the last run.
	removed := spiffeid.RequireTrustDomainFromString("removed.example")
	if err := store.Save(context.Background(), removed, mustMarshal(t, spiffebundle.FromX509Authorities(removed, []*x509.Certificate{peerCA(t).RootCert}))); err != nil {
		t.Fatal(err)
	}
	run(p, func(s *Set) bool {
		stored, _ := store.Load(context.Background())
		b, err := ParseBundle(peer, stored[peer])
		if err != nil {
			return false
		}
		_, seq := b.SequenceNumber() // the endpoint's, not the bootstrap's
		return seq && stored[removed] == nil
	}, "the bundle stored and the removed trust domain pruned")

	p.URL = "https://127.0.0.1:1/gone"
	s := run(p, func(s *Set) bool { return s.Status(time.Now())[0].From == "store" }, "the stored bundle loaded")
	st := s.Status(time.Now())[0]
	if len(st.Bundle.X509Authorities()) != 2 || !st.Stale {
		t.Errorf("from the store: %d authorities, stale %v; want 2, stale", len(st.Bundle.X509Authorities()), st.Stale)
	}
	if seq, _ := st.Bundle.SequenceNumber(); seq != 7 {
		t.Errorf("sequence number %d, want 7", seq)
	}
}

func FuzzParseBundle(f *testing.F) {
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"spiffe_sequence":1,"spiffe_refresh_hint":300,"keys":[{"use":"x509-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA","x5c":["AA=="]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParseBundle(peer, data)
		if err != nil {
			return
		}
		if b.TrustDomain() != peer || len(b.X509Authorities()) == 0 {
			t.Fatalf("accepted a bundle of %s with %d X.509 authorities", b.TrustDomain(), len(b.X509Authorities()))
		}
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20 s", what)
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}

func peerCA(t *testing.T) *keys.Material {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: peer.String(), Algorithm: keys.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// svid is a TLS certificate for 127.0.0.1 carrying id, under m.
func svid(t *testing.T, m *keys.Material, id spiffeid.ID) tls.Certificate {
	t.Helper()
	key, err := keys.GenerateKey(keys.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id.String())
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{u},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, m.CACert, key.Public(), m.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, m.CACert.Raw}, PrivateKey: key}
}

func mustMarshal(t *testing.T, b *spiffebundle.Bundle) []byte {
	t.Helper()
	data, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func bundleDoc(t *testing.T, b *spiffebundle.Bundle) string { return string(mustMarshal(t, b)) }
