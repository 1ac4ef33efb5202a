package agent

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/keepalive"
)

// rotatingCA is a CA in the middle of a root rotation: it signs under cur
// and trusts old as well.
type rotatingCA struct {
	old, cur *keys.Material
}

func newRotatingCA(t testing.TB) rotatingCA {
	t.Helper()
	var ms [2]*keys.Material
	for i := range ms {
		m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
		if err != nil {
			t.Fatal(err)
		}
		ms[i] = m
	}
	return rotatingCA{old: ms[0], cur: ms[1]}
}

// issue signs a certificate for web and key with r.cur's intermediate, or
// with its root directly when signing is that root, trusting roots.
func (r rotatingCA) issue(t testing.TB, key crypto.Signer, signing *x509.Certificate, roots ...*x509.Certificate) *ca.Certificate {
	t.Helper()
	m := r.cur
	cert, signer, inter := m.CACert, m.CAKey, m.Chain
	if signing == m.RootCert {
		cert, signer, inter = m.RootCert, m.RootKey, nil
	}
	is, err := ca.NewIssuer(cert, signer, inter, roots, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(ca.Config{Issuers: fixedIssuer{is}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := a.Issue(ca.Request{ID: web, PublicKey: key.Public()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type fixedIssuer struct{ is *ca.Issuer }

func (f fixedIssuer) Issuer() *ca.Issuer { return f.is }

func pemOf(certs ...*x509.Certificate) string {
	var s string
	for _, c := range certs {
		s += string(ca.EncodePEM(c))
	}
	return s
}

func TestParseChainPicksTheIssuingRoot(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	for name, roots := range map[string][]*x509.Certificate{
		"one root":                    {r.cur.RootCert},
		"signing root first":          {r.cur.RootCert, r.old.RootCert},
		"signing root second":         {r.old.RootCert, r.cur.RootCert},
		"signing root between others": {r.old.RootCert, r.cur.RootCert, newRotatingCA(t).old.RootCert},
	} {
		t.Run(name, func(t *testing.T) {
			leaf := r.issue(t, key, r.cur.CACert, r.cur.RootCert).Leaf
			// The last element as the CA wrote it, in the order given.
			chain, err := ParseChain([]string{pemOf(leaf), pemOf(r.cur.CACert), pemOf(roots...)})
			if err != nil {
				t.Fatal(err)
			}
			if len(chain) != 3 || !chain[0].Equal(leaf) || !chain[1].Equal(r.cur.CACert) || !chain[2].Equal(r.cur.RootCert) {
				t.Fatalf("chain of %d is not leaf, intermediate, signing root", len(chain))
			}
			svid, err := new(sharedCerts).svid(web, key, chain)
			if err != nil {
				t.Fatal(err)
			}
			if !svid.Root.Equal(r.cur.RootCert) {
				t.Error("SVID's root is not the signing root")
			}
		})
	}
}

func TestParseChainFromTheCA(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	for name, signing := range map[string]*x509.Certificate{
		"intermediate signs": r.cur.CACert,
		"root signs":         r.cur.RootCert,
	} {
		t.Run(name, func(t *testing.T) {
			cert := r.issue(t, key, signing, r.old.RootCert, r.cur.RootCert)
			chain, err := ParseChain(cert.ChainPEM)
			if err != nil {
				t.Fatal(err)
			}
			if got := chain[len(chain)-1]; !got.Equal(r.cur.RootCert) {
				t.Errorf("chain ends in %q, want the signing root", got.Subject)
			}
			if len(chain) != len(cert.ChainPEM) {
				t.Errorf("chain of %d for %d elements: the other root was kept", len(chain), len(cert.ChainPEM))
			}
			if _, err := new(sharedCerts).svid(web, key, chain); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestParseChainRefusesRootsThatDidNotIssue(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	leaf := r.issue(t, key, r.cur.CACert, r.cur.RootCert).Leaf
	other := newRotatingCA(t)
	_, err := ParseChain([]string{pemOf(leaf), pemOf(r.cur.CACert), pemOf(r.old.RootCert, other.old.RootCert)})
	if err == nil || !strings.Contains(err.Error(), "none of the 2 roots the CA sent issued") {
		t.Fatalf("err = %v, want none of the roots issued", err)
	}
	for name, in := range map[string][]string{
		"one element":   {pemOf(leaf)},
		"roots not PEM": {pemOf(leaf), pemOf(r.cur.CACert), "junk"},
		"empty roots":   {pemOf(leaf), pemOf(r.cur.CACert), ""},
	} {
		if _, err := ParseChain(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A Signer may hand the manager a flattened answer: every root at the end.
func TestSVIDFromFlattenedRoots(t *testing.T) {
	r := newRotatingCA(t)
	key, _ := NewKey(ECDSAP256)
	other := newRotatingCA(t)
	withInter := r.issue(t, key, r.cur.CACert, r.cur.RootCert).Leaf
	direct := r.issue(t, key, r.cur.RootCert, r.cur.RootCert).Leaf
	for name, tc := range map[string]struct {
		chain   []*x509.Certificate
		wantErr string
	}{
		"signing root first":  {chain: []*x509.Certificate{withInter, r.cur.CACert, r.cur.RootCert, r.old.RootCert}},
		"signing root second": {chain: []*x509.Certificate{withInter, r.cur.CACert, r.old.RootCert, r.cur.RootCert}},
		"root signs, first":   {chain: []*x509.Certificate{direct, r.cur.RootCert, r.old.RootCert}},
		"root signs, second":  {chain: []*x509.Certificate{direct, r.old.RootCert, r.cur.RootCert}},
		"no root issued":      {chain: []*x509.Certificate{withInter, r.cur.CACert, r.old.RootCert, other.cur.RootCert}, wantErr: "none of the 2 roots"},
		"lone wrong root":     {chain: []*x509.Certificate{withInter, r.cur.CACert, r.old.RootCert}, wantErr: "does not verify"},
	} {
		t.Run(name, func(t *testing.T) {
			svid, err := new(sharedCerts).svid(web, key, tc.chain)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !svid.Root.Equal(r.cur.RootCert) {
				t.Error("SVID's root is not the signing root")
			}
			inter := svid.Certificates()[1:]
			if want := tc.chain[1 : len(tc.chain)-2]; len(inter) != len(want) {
				t.Errorf("%d intermediates served, want %d: roots must not be served as intermediates", len(inter), len(want))
			}
		})
	}
}

// FuzzParseChain: any answer gives a chain or an error, never a panic, and a
// chain always ends in a root that issued the certificate before it. The
// elements of an answer are joined by NUL, which PEM never holds.
func FuzzParseChain(f *testing.F) {
	r := newRotatingCA(f)
	key, _ := NewKey(ECDSAP256)
	for _, signing := range []*x509.Certificate{r.cur.CACert, r.cur.RootCert} {
		cert := r.issue(f, key, signing, r.old.RootCert, r.cur.RootCert)
		f.Add(strings.Join(cert.ChainPEM, "\x00"))
	}
	leaf := r.issue(f, key, r.cur.CACert, r.cur.RootCert).Leaf
	f.Add(strings.Join([]string{pemOf(leaf), pemOf(r.cur.CACert), pemOf(r.old.RootCert)}, "\x00"))
	f.Add(strings.Join([]string{pemOf(leaf), pemOf(r.cur.CACert, r.cur.RootCert)}, "\x00"))
	f.Fuzz(func(t *testing.T, answer string) {
		chain, err := ParseChain(strings.Split(answer, "\x00"))
		if err != nil {
			return
		}
		if len(chain) < 2 {
			t.Fatalf("chain of %d accepted", len(chain))
		}
		if err := chain[len(chain)-2].CheckSignatureFrom(chain[len(chain)-1]); err != nil {
			t.Fatalf("chain ends in a root that did not issue the certificate before it: %v", err)
		}
	})
}

// servingCert is a TLS server certificate for localhost and 127.0.0.1 from
// m's intermediate, with the given extended key usage.
func servingCert(t *testing.T, m *keys.Material, eku x509.ExtKeyUsage) tls.Certificate {
	t.Helper()
	key, err := NewKey(ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{eku},
	}, m.CACert, key.Public(), m.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, m.CACert.Raw}, PrivateKey: key}
}

// serveTLS runs a gRPC server with a health service on loopback over TLS
// with cert, and returns its address.
func serveTLS(t *testing.T, cert tls.Certificate) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

// fastRetry makes a failed connection retried at once, so that a test sees
// the next handshake without sleeping.
var fastRetry = grpc.WithConnectParams(grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: time.Millisecond, Multiplier: 1, MaxDelay: time.Millisecond},
	MinConnectTimeout: 10 * time.Second,
})

func healthCheck(ctx context.Context, conn *grpc.ClientConn, opts ...grpc.CallOption) error {
	_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, opts...)
	return err
}

// After a root rotation switches signing, meshid-ca serves a certificate
// under the new root: the agent's connection must trust it as soon as the
// agent's bundle does, without dialing again.
func TestDialCAVerifiesAgainstTheRootsOfEachHandshake(t *testing.T) {
	r := newRotatingCA(t)
	addr := serveTLS(t, servingCert(t, r.cur, x509.ExtKeyUsageServerAuth))
	bundle := NewBundle(spiffeid.RequireTrustDomainFromString("cluster.local"), []*x509.Certificate{r.old.RootCert})
	var asked atomic.Int32
	roots := func() []*x509.Certificate {
		asked.Add(1)
		return bundle.Roots()
	}
	conn, err := DialCA(addr, roots, "localhost", fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	err = healthCheck(ctx, conn)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "does not verify against the 1 trusted roots") {
		t.Fatalf("with the old root only: err = %v, want the handshake refused", err)
	}

	bundle.Set([]*x509.Certificate{r.old.RootCert, r.cur.RootCert})
	before := asked.Load()
	if err := healthCheck(ctx, conn, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("with old and new roots: %v", err)
	}
	if asked.Load() == before {
		t.Error("the roots were not asked for at the new handshake")
	}
}

func TestDialCAChecksTheServer(t *testing.T) {
	r := newRotatingCA(t)
	good := serveTLS(t, servingCert(t, r.cur, x509.ExtKeyUsageServerAuth))
	clientOnly := serveTLS(t, servingCert(t, r.cur, x509.ExtKeyUsageClientAuth))
	cur := func() []*x509.Certificate { return []*x509.Certificate{r.cur.RootCert} }
	for name, tc := range map[string]struct {
		addr, serverName string
		roots            func() []*x509.Certificate
		wantErr          string // "" for success
	}{
		"good":                {addr: good, serverName: "localhost", roots: cur},
		"host of the address": {addr: good, roots: cur},
		"gRPC target":         {addr: "dns:///" + good, roots: cur},
		"another name":        {addr: good, serverName: "meshid-ca.meshid-system.svc", roots: cur, wantErr: "certificate is valid for localhost"},
		"client certificate":  {addr: clientOnly, serverName: "localhost", roots: cur, wantErr: "incompatible key usage"},
		"no roots":            {addr: good, serverName: "localhost", roots: func() []*x509.Certificate { return nil }, wantErr: "no trusted roots"},
		"another CA's root":   {addr: good, serverName: "localhost", roots: func() []*x509.Certificate { return []*x509.Certificate{r.old.RootCert} }, wantErr: "unknown authority"},
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := DialCA(tc.addr, tc.roots, tc.serverName)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			err = healthCheck(ctx, conn)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
	if _, err := DialCA(":15012", cur, ""); err == nil || !strings.Contains(err.Error(), "no server name") {
		t.Errorf("address without a host: err = %v, want no server name", err)
	}
	if _, err := DialCA(good, nil, "localhost"); err == nil {
		t.Error("nil roots accepted")
	}
}

func TestHostOf(t *testing.T) {
	for addr, want := range map[string]string{
		"meshid-ca.meshid-system.svc:15012":        "meshid-ca.meshid-system.svc",
		"dns:///meshid-ca.meshid-system.svc:15012": "meshid-ca.meshid-system.svc",
		"dns://8.8.8.8/meshid-ca:15012":            "meshid-ca",
		"127.0.0.1:15012":                          "127.0.0.1",
		"[::1]:15012":                              "::1",
		"meshid-ca":                                "meshid-ca",
		":15012":                                   "",
	} {
		if got := hostOf(addr); got != want {
			t.Errorf("hostOf(%q) = %q, want %q", addr, got, want)
		}
	}
}

// TestDialCAFindsADeadConnection: a partition that drops every packet
// leaves the connection looking open; DialCA's pings must find it dead and
// dial again, so that a request after the partition heals is answered
// instead of hanging on the old connection.
func TestDialCAFindsADeadConnection(t *testing.T) {
	r := newRotatingCA(t)
	cert := servingCert(t, r.cur, x509.ExtKeyUsageServerAuth)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)

	proxy := toxiproxy.NewProxy(toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop()), "ca", "127.0.0.1:0", lis.Addr().String())
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	conn, err := DialCA(proxy.Listen, func() []*x509.Certificate { return []*x509.Certificate{r.cur.RootCert} }, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := healthCheck(ctx, conn, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}

	for _, stream := range []string{"upstream", "downstream"} {
		if _, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"name":"drop-` + stream + `","type":"timeout","stream":"` + stream + `","attributes":{"timeout":0}}`)); err != nil {
			t.Fatal(err)
		}
	}
	short, cancelShort := context.WithTimeout(t.Context(), 2*time.Second)
	err = healthCheck(short, conn)
	cancelShort()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("during the partition: %v, want DeadlineExceeded", err)
	}
	// Longer than the pings' interval and timeout: the connection is
	// found dead while the partition lasts.
	time.Sleep(CAKeepalive.Time + CAKeepalive.Timeout + time.Second) // the partition's length
	proxy.Toxics.ResetToxics(context.Background())

	begin := time.Now()
	after, cancelAfter := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancelAfter()
	if err := healthCheck(after, conn, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("after the partition healed: %v (the dead connection was kept)", err)
	}
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("answered %s after the partition healed, want at once on a new connection", took)
	}
}

// A serving certificate minutes in this node's future (the node's clock
// behind, the CA just restarted) is taken; one further off is not.
func TestVerifyCAWithThisNodesClockBehind(t *testing.T) {
	m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local", Algorithm: keys.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ahead time.Duration
		ok    bool
	}{{3 * time.Minute, true}, {MaxClockBehind - time.Minute, true}, {MaxClockBehind + time.Minute, false}} {
		key, _ := NewKey(ECDSAP256)
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(1),
			NotBefore:    time.Now().Add(tc.ahead),
			NotAfter:     time.Now().Add(tc.ahead + time.Hour),
			DNSNames:     []string{"localhost"},
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}, m.CACert, key.Public(), m.CAKey)
		if err != nil {
			t.Fatal(err)
		}
		leaf, _ := x509.ParseCertificate(der)
		err = VerifyCA([]*x509.Certificate{leaf, m.CACert}, []*x509.Certificate{m.RootCert}, "localhost")
		if (err == nil) != tc.ok {
			t.Errorf("valid from %s ahead: VerifyCA = %v, want ok=%v", tc.ahead, err, tc.ok)
		}
	}
}
