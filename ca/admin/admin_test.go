package admin_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/admin"
	"github.com/meshid/meshid/ca/admin/adminpb"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/server"
	"github.com/meshid/meshid/internal/satoken"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("cluster.local")
	adminID = spiffeid.RequireFromPath(td, "/ns/ops/sa/admin")
	webID   = spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
)

// env is meshid-ca's admin API over real TLS on loopback, on a real SQLite
// ledger, with tokens checked offline against a local issuer.
type env struct {
	t         *testing.T
	material  *keys.Material
	authority *ca.Authority
	issuers   *keys.Source
	roots     *x509.CertPool
	ledger    *ledger.Ledger
	issued    *ledger.Ledger
	denyList  *admin.DenyList
	tokens    *satoken.Issuer
	addr      string
}

// sibling is another CA under this one's root: what a second cluster
// sharing a plug-in root runs.
func (e *env) sibling() *ca.Authority {
	e.t.Helper()
	other := *e.material
	if err := other.RenewIntermediate(keys.ECDSAP256, 24*time.Hour, time.Now()); err != nil {
		e.t.Fatal(err)
	}
	is, err := other.Issuer(time.Now())
	if err != nil {
		e.t.Fatal(err)
	}
	a, err := ca.New(ca.Config{Issuers: fixed{is}})
	if err != nil {
		e.t.Fatal(err)
	}
	return a
}

func newEnv(t *testing.T) *env {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: td.Name()})
	if err != nil {
		t.Fatal(err)
	}
	is, err := m.Issuer(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, issuers: &keys.Source{}, roots: x509.NewCertPool(), denyList: &admin.DenyList{}, material: m}
	e.issuers.Set(is)
	e.roots.AddCert(m.RootCert)
	if e.authority, err = ca.New(ca.Config{Issuers: e.issuers}); err != nil {
		t.Fatal(err)
	}
	if e.ledger, err = ledger.Open(context.Background(), ledger.Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "ledger.db")}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.ledger.Close() })
	if e.issued, err = ledger.Open(context.Background(), ledger.Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "issued.db")}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.issued.Close() })
	if e.tokens, err = satoken.New("https://issuer.test"); err != nil {
		t.Fatal(err)
	}
	jwks := filepath.Join(t.TempDir(), "jwks.json")
	os.WriteFile(jwks, e.tokens.JWKS(), 0o644)
	authn := &k8sauth.JWKS{Issuer: e.tokens.URL, Audiences: []string{"istio-ca"}, Keys: k8sauth.NewFileKeySet(jwks)}
	serving := &server.ServingCertificate{Authority: e.authority, Issuers: e.issuers, DNSNames: []string{"localhost"}}
	srv, err := admin.New(admin.Config{
		Ledger: e.ledger, LedgerKind: "sqlite", DenyList: e.denyList, Issuers: e.issuers,
		Serving:     func() (*x509.Certificate, error) { c, err := serving.Certificate(); return c.Leaf, err },
		TrustDomain: td, CASource: "dir",
		Admins: &admin.Admins{IDs: []spiffeid.ID{adminID}, Issued: e.issued, ServiceAccounts: []string{"ops/admin"}, Auth: authn},
		Log:    slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	g := admin.NewGRPCServer(srv, e.issuers, serving.GetCertificate)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	e.addr = lis.Addr().String()
	return e
}

// client dials with an optional client certificate and token.
func (e *env) client(cert *tls.Certificate, token string) adminpb.AdminClient {
	e.t.Helper()
	cfg := &tls.Config{RootCAs: e.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}
	if token != "" {
		opts = append(opts, grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token), method, req, reply, cc, opts...)
		}))
	}
	conn, err := grpc.NewClient(e.addr, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return adminpb.NewAdminClient(conn)
}

// adminCert is a certificate for id issued by this CA and recorded, as
// meshid-ca records every certificate (in a ledger of its own here, so the
// tests of what the admin API reads see only their own records).
func (e *env) adminCert(id spiffeid.ID) *tls.Certificate {
	e.t.Helper()
	tc, c := issue(e.t, e.authority, id)
	spki := sha256.Sum256(c.Leaf.RawSubjectPublicKeyInfo)
	seg := strings.Split(id.Path(), "/")
	if err := e.issued.Record(context.Background(), ledger.Record{
		Serial: fmt.Sprintf("%x", c.Leaf.SerialNumber), SPIFFEID: id.String(), Namespace: seg[2], ServiceAccount: seg[4],
		ClusterID: "Kubernetes", PublicKeySHA256: hex.EncodeToString(spki[:]),
		NotBefore: c.Leaf.NotBefore, NotAfter: c.Leaf.NotAfter, IssuerFingerprint: c.Issuer.Fingerprint(),
		AuthMethod: "jwks", IssuedAt: time.Now(),
	}); err != nil {
		e.t.Fatal(err)
	}
	return tc
}

// clientCert is a certificate for id issued by authority, recorded nowhere.
func clientCert(t *testing.T, authority *ca.Authority, id spiffeid.ID) *tls.Certificate {
	t.Helper()
	tc, _ := issue(t, authority, id)
	return tc
}

func issue(t *testing.T, authority *ca.Authority, id spiffeid.ID) (*tls.Certificate, *ca.Certificate) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c, err := authority.Issue(ca.Request{ID: id, PublicKey: key.Public(), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	tc := &tls.Certificate{PrivateKey: crypto.Signer(key), Leaf: c.Leaf, Certificate: [][]byte{c.Leaf.Raw}}
	for _, inter := range c.Issuer.Chain()[:len(c.Issuer.Chain())-1] {
		tc.Certificate = append(tc.Certificate, inter.Raw)
	}
	return tc, c
}

func (e *env) token(ns, sa string) string {
	e.t.Helper()
	tok, err := e.tokens.Token(satoken.Claims{Namespace: ns, ServiceAccount: sa, Audiences: []string{"istio-ca"}})
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func (e *env) record(id spiffeid.ID, pod string, issued, notAfter time.Time) ledger.Record {
	e.t.Helper()
	seg := strings.Split(id.Path(), "/")
	r := ledger.Record{
		Serial: fmt.Sprintf("%x", issued.UnixNano()), SPIFFEID: id.String(), Namespace: seg[2], ServiceAccount: seg[4],
		PodName: pod, PodUID: "uid-" + pod, ClusterID: "Kubernetes", PublicKeySHA256: strings.Repeat("ab", 32),
		NotBefore: issued.Add(-time.Minute), NotAfter: notAfter, IssuerFingerprint: strings.Repeat("cd", 32),
		AuthMethod: "tokenreview", IssuedAt: issued,
	}
	if err := e.ledger.Record(context.Background(), r); err != nil {
		e.t.Fatal(err)
	}
	return r
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestRefusesNonAdmins(t *testing.T) {
	e := newEnv(t)
	other, err := keys.Generate(keys.Options{TrustDomain: td.Name()})
	if err != nil {
		t.Fatal(err)
	}
	otherIs, _ := other.Issuer(time.Now())
	otherAuthority, _ := ca.New(ca.Config{Issuers: fixed{otherIs}})
	for _, tc := range []struct {
		name   string
		client adminpb.AdminClient
		code   codes.Code
	}{
		{"no credentials", e.client(nil, ""), codes.Unauthenticated},
		{"garbage token", e.client(nil, "not-a-token"), codes.Unauthenticated},
		{"token of another service account", e.client(nil, e.token("shop", "web")), codes.PermissionDenied},
		{"token of the admin account from another issuer", e.client(nil, otherToken(t)), codes.Unauthenticated},
		{"certificate of a non-admin", e.client(e.adminCert(webID), ""), codes.PermissionDenied},
		{"non-admin certificate beside an admin token", e.client(e.adminCert(webID), e.token("ops", "admin")), codes.PermissionDenied},
		{"admin ID from another CA", e.client(clientCert(t, otherAuthority, adminID), ""), codes.Unavailable}, // the handshake fails
		// One root for several clusters (a shared plug-in root): another
		// cluster's CA, its own intermediate under our root, issues the
		// admin ID. The handshake passes; the certificate is not ours.
		{"admin ID from another CA under the same root", e.client(clientCert(t, e.sibling(), adminID), ""), codes.PermissionDenied},
		// Our own signing path, but never recorded: not a certificate this
		// CA handed out.
		{"admin ID this CA never recorded", e.client(clientCert(t, e.authority, adminID), ""), codes.PermissionDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := map[string]func() error{
				"ListIdentities": func() error { _, err := tc.client.ListIdentities(ctx(t), &adminpb.ListIdentitiesRequest{}); return err },
				"ListCertificates": func() error {
					_, err := tc.client.ListCertificates(ctx(t), &adminpb.ListCertificatesRequest{})
					return err
				},
				"DenyIdentity": func() error {
					_, err := tc.client.DenyIdentity(ctx(t), &adminpb.DenyIdentityRequest{SpiffeId: webID.String(), Reason: "x"})
					return err
				},
				"GetBundle": func() error { _, err := tc.client.GetBundle(ctx(t), &adminpb.GetBundleRequest{}); return err },
				"ListFederatedBundles": func() error {
					_, err := tc.client.ListFederatedBundles(ctx(t), &adminpb.ListFederatedBundlesRequest{})
					return err
				},
				"GetStatus": func() error { _, err := tc.client.GetStatus(ctx(t), &adminpb.GetStatusRequest{}); return err },
				"GetCertificate": func() error {
					_, err := tc.client.GetCertificate(ctx(t), &adminpb.GetCertificateRequest{Serial: "1"})
					return err
				},
				"AllowIdentity": func() error {
					_, err := tc.client.AllowIdentity(ctx(t), &adminpb.AllowIdentityRequest{SpiffeId: webID.String()})
					return err
				},
				"GetRootRotation": func() error {
					_, err := tc.client.GetRootRotation(ctx(t), &adminpb.GetRootRotationRequest{})
					return err
				},
				"AdvanceRootRotation": func() error {
					_, err := tc.client.AdvanceRootRotation(ctx(t), &adminpb.AdvanceRootRotationRequest{FromStage: "none", Force: true})
					return err
				},
				"AbortRootRotation": func() error {
					_, err := tc.client.AbortRootRotation(ctx(t), &adminpb.AbortRootRotationRequest{FromStage: "prepared"})
					return err
				},
			}
			if len(calls) != len(adminpb.Admin_ServiceDesc.Methods) {
				t.Fatalf("%d methods tried, the service has %d: add the new ones", len(calls), len(adminpb.Admin_ServiceDesc.Methods))
			}
			for name, call := range calls {
				if err := call(); status.Code(err) != tc.code {
					t.Errorf("%s: %v, want %s", name, err, tc.code)
				}
			}
		})
	}
	if e.denyList.Denied(webID.String()) {
		t.Error("a refused caller denied an identity")
	}
}

type fixed struct{ is *ca.Issuer }

func (f fixed) Issuer() *ca.Issuer { return f.is }

func otherToken(t *testing.T) string {
	iss, err := satoken.New("https://issuer.test")
	if err != nil {
		t.Fatal(err)
	}
	tok, err := iss.Token(satoken.Claims{Namespace: "ops", ServiceAccount: "admin", Audiences: []string{"istio-ca"}})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestAdminReadsLedger(t *testing.T) {
	e := newEnv(t)
	now := time.Now().UTC().Truncate(time.Microsecond)
	old := e.record(webID, "web-1", now.Add(-3*time.Hour), now.Add(-2*time.Hour))
	soon := e.record(webID, "web-2", now.Add(-50*time.Minute), now.Add(10*time.Minute))
	later := e.record(spiffeid.RequireFromPath(td, "/ns/shop/sa/api"), "api-1", now.Add(-time.Minute), now.Add(23*time.Hour))

	for name, c := range map[string]adminpb.AdminClient{
		"certificate": e.client(e.adminCert(adminID), ""),
		"token":       e.client(nil, e.token("ops", "admin")),
	} {
		t.Run(name, func(t *testing.T) {
			all, err := c.ListCertificates(ctx(t), &adminpb.ListCertificatesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if got := serials(all.Certificates); got != strings.Join([]string{later.Serial, soon.Serial, old.Serial}, ",") {
				t.Errorf("all, newest first: %s", got)
			}
			expiring, err := c.ListCertificates(ctx(t), &adminpb.ListCertificatesRequest{ExpiringWithin: durationpb.New(time.Hour)})
			if err != nil || serials(expiring.Certificates) != soon.Serial {
				t.Errorf("expiring within 1h: %v, %v", serials(expiring.GetCertificates()), err)
			}
			byPod, err := c.ListCertificates(ctx(t), &adminpb.ListCertificatesRequest{Namespace: "shop", PodName: "web-1"})
			if err != nil || serials(byPod.Certificates) != old.Serial {
				t.Errorf("by pod: %v, %v", serials(byPod.GetCertificates()), err)
			}
			one, err := c.GetCertificate(ctx(t), &adminpb.GetCertificateRequest{Serial: strings.ToUpper(soon.Serial)})
			if err != nil || one.GetPodUid() != "uid-web-2" || !one.GetNotAfter().AsTime().Equal(soon.NotAfter) {
				t.Errorf("get: %v, %v", one, err)
			}
			if _, err := c.GetCertificate(ctx(t), &adminpb.GetCertificateRequest{Serial: "ffff"}); status.Code(err) != codes.NotFound {
				t.Errorf("unknown serial: %v, want NotFound", err)
			}
			if _, err := c.ListCertificates(ctx(t), &adminpb.ListCertificatesRequest{PageToken: "garbage!"}); status.Code(err) != codes.InvalidArgument {
				t.Errorf("bad page token: %v, want InvalidArgument", err)
			}
			ids, err := c.ListIdentities(ctx(t), &adminpb.ListIdentitiesRequest{Namespace: "shop"})
			if err != nil || len(ids.Identities) != 2 {
				t.Fatalf("identities: %v, %v", ids, err)
			}
			web := ids.Identities[1]
			if web.SpiffeId != webID.String() || web.ValidCertificates != 1 || !web.SoonestExpiry.AsTime().Equal(soon.NotAfter) || !web.LastIssued.AsTime().Equal(soon.IssuedAt) {
				t.Errorf("web identity: %v", web)
			}
			// Listing never carries key material: nothing PEM- or
			// key-shaped in any answer.
			for _, m := range []proto.Message{all, ids, one} {
				text := protojson.Format(m)
				for _, bad := range []string{"BEGIN", "PRIVATE", "eyJ"} {
					if strings.Contains(text, bad) {
						t.Errorf("answer contains %q: %s", bad, text)
					}
				}
			}
		})
	}
}

func TestDenyAndAllow(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.adminCert(adminID), "")
	for _, bad := range []*adminpb.DenyIdentityRequest{
		{SpiffeId: webID.String()}, // no reason
		{SpiffeId: "spiffe://other.domain/ns/shop/sa/web", Reason: "x"},
		{SpiffeId: "not a spiffe id", Reason: "x"},
	} {
		if _, err := c.DenyIdentity(ctx(t), bad); status.Code(err) != codes.InvalidArgument {
			t.Errorf("deny %v: %v, want InvalidArgument", bad, err)
		}
	}
	if e.denyList.Denied(webID.String()) {
		t.Fatal("a refused deny took effect")
	}
	d, err := c.DenyIdentity(ctx(t), &adminpb.DenyIdentityRequest{SpiffeId: webID.String(), Reason: "INC-1: leaked token"})
	if err != nil {
		t.Fatal(err)
	}
	if d.DeniedBy != adminID.String() || d.Reason != "INC-1: leaked token" || time.Since(d.DeniedAt.AsTime()) > time.Minute {
		t.Errorf("denial %v", d)
	}
	if !e.denyList.Denied(webID.String()) {
		t.Error("deny not in effect on this replica at once")
	}
	ds, err := e.ledger.Denials(context.Background())
	if err != nil || len(ds) != 1 || ds[0].By != adminID.String() {
		t.Errorf("ledger denials: %v, %v", ds, err)
	}
	ids, err := c.ListIdentities(ctx(t), &adminpb.ListIdentitiesRequest{})
	if err != nil || len(ids.Identities) != 1 || ids.Identities[0].Denial.GetReason() != "INC-1: leaked token" {
		t.Errorf("a denied identity without certificates is listed: %v, %v", ids, err)
	}
	allowed, err := c.AllowIdentity(ctx(t), &adminpb.AllowIdentityRequest{SpiffeId: webID.String()})
	if err != nil || !allowed.WasDenied || e.denyList.Denied(webID.String()) {
		t.Errorf("allow: %v, %v, still denied %v", allowed, err, e.denyList.Denied(webID.String()))
	}
	again, err := c.AllowIdentity(ctx(t), &adminpb.AllowIdentityRequest{SpiffeId: webID.String()})
	if err != nil || again.WasDenied {
		t.Errorf("allow twice: %v, %v", again, err)
	}
}

func TestStatusAndBundle(t *testing.T) {
	e := newEnv(t)
	c := e.client(nil, e.token("ops", "admin"))
	st, err := c.GetStatus(ctx(t), &adminpb.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	is := e.issuers.Issuer()
	if !st.Ready || st.TrustDomain != "cluster.local" || st.Root.GetFingerprintSha256() != ca.Fingerprint(is.Root()) ||
		st.Intermediate.GetFingerprintSha256() != is.Fingerprint() || st.Serving == nil || !st.Ledger.GetReachable() || st.Ledger.GetDriver() != "sqlite" {
		t.Errorf("status %v", st)
	}
	b, err := c.GetBundle(ctx(t), &adminpb.GetBundleRequest{})
	if err != nil || len(b.Roots) != 1 || b.TrustDomain != "cluster.local" {
		t.Fatalf("bundle %v, %v", b, err)
	}
	if root, err := x509.ParseCertificate(b.Roots[0]); err != nil || !root.Equal(is.Root()) {
		t.Errorf("bundle root is not the CA's root: %v", err)
	}
	e.ledger.Close()
	st, err = c.GetStatus(ctx(t), &adminpb.GetStatusRequest{})
	if err != nil || st.Ledger.GetReachable() || st.Ready {
		t.Errorf("with the ledger closed: %v, %v", st, err)
	}
}

func serials(cs []*adminpb.Certificate) string {
	var s []string
	for _, c := range cs {
		s = append(s, c.Serial)
	}
	return strings.Join(s, ",")
}

type denialsFunc func(context.Context) ([]ledger.Denial, error)

func (f denialsFunc) Denials(ctx context.Context) ([]ledger.Denial, error) { return f(ctx) }

// A refresh that read the ledger just before a deny committed must not put
// the old set back over the deny made here.
func TestDenyListRefreshKeepsADenyMadeMeanwhile(t *testing.T) {
	led, err := ledger.Open(context.Background(), ledger.Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "ledger.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer led.Close()
	dl := &admin.DenyList{}
	x := ledger.Denial{SPIFFEID: webID.String(), Reason: "INC-2", By: "admin", At: time.Now().UTC()}
	read := denialsFunc(func(ctx context.Context) ([]ledger.Denial, error) {
		ds, err := led.Denials(ctx)              // the refresh reads: no denial yet
		if err := led.Deny(ctx, x); err != nil { // meanwhile the deny commits
			t.Fatal(err)
		}
		dl.Deny(x) // and is applied here
		return ds, err
	})
	if err := dl.Load(context.Background(), read); err != nil {
		t.Fatal(err)
	}
	if !dl.Denied(webID.String()) {
		t.Fatal("a refresh that read the ledger before the deny dropped it")
	}
	if err := dl.Load(context.Background(), led); err != nil || !dl.Denied(webID.String()) {
		t.Fatalf("the next refresh: denied=%v err=%v", dl.Denied(webID.String()), err)
	}
}
