package workloadapi_test

import (
	"context"
	"crypto/x509"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	gojwtsvid "github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/internal/catest"
)

// jwtMinter is catest's CA as the agent's JWTMinter.
type jwtMinter struct{ c *catest.CA }

func (m jwtMinter) MintJWT(_ context.Context, token string, audience []string) (*agent.JWTSVID, error) {
	s, err := m.c.SignJWT(token, audience)
	if err != nil {
		return nil, err
	}
	return &agent.JWTSVID{Token: s.Token, ID: s.ID, Audience: s.Audience, IssuedAt: s.IssuedAt, Expiry: s.Expiry}, nil
}

// TestGoSpiffeJWT: go-spiffe's own Workload API client and JWTSource get
// JWT-SVIDs and JWT bundles from the agent and validate tokens through it:
// meshid's tokens for the right audience pass; another audience, an
// expired token, junk, and a foreign trust domain's token are refused, the
// last until meshid federates with it, and again once it stops.
func TestGoSpiffeJWT(t *testing.T) {
	c := catest.New(t)
	other := spiffeid.RequireTrustDomainFromString("other.example")
	peerCA := catest.NewIn(t, other.String())
	id := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	bundle := agent.NewBundle(td, []*x509.Certificate{c.Root()})
	bundle.SetJWTAuthorities(c.JWTAuthorities())
	addr := serveBundle(t, c, id, time.Hour, bundle)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	svid, err := client.FetchJWTSVID(ctx, gojwtsvid.Params{Audience: "db", ExtraAudiences: []string{"cache"}})
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID != id || len(svid.Audience) != 2 {
		t.Fatalf("FetchJWTSVID: %s for %v; want %s for [db cache]", svid.ID, svid.Audience, id)
	}
	if left := time.Until(svid.Expiry); left <= 0 || left > jwtsvid.DefaultTTL {
		t.Errorf("JWT-SVID lives %v more; want at most %v", left, jwtsvid.DefaultTTL)
	}
	again, err := client.FetchJWTSVID(ctx, gojwtsvid.Params{Audience: "cache", ExtraAudiences: []string{"db"}})
	if err != nil || again.Marshal() != svid.Marshal() {
		t.Errorf("the same audiences asked again: a new token (%v); want the one held", err)
	}

	// go-spiffe validates it offline with the bundles the agent serves…
	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gojwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{"db"}); err != nil {
		t.Fatalf("go-spiffe refuses meshid's JWT-SVID with the agent's bundle: %v", err)
	}
	// …and through the agent.
	got, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "cache")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != id || got.Claims["sub"] != id.String() {
		t.Errorf("ValidateJWTSVID: %s, claims %v", got.ID, got.Claims)
	}

	// A JWTSource and a BundleSource (which watches both kinds) start.
	src, err := workloadapi.NewJWTSource(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if s, err := src.FetchJWTSVID(ctx, gojwtsvid.Params{Audience: "db"}); err != nil || s.ID != id {
		t.Errorf("JWTSource.FetchJWTSVID: %v, %v", s, err)
	}
	bsrc, err := workloadapi.NewBundleSource(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatal(err)
	}
	defer bsrc.Close()
	if _, err := bsrc.GetJWTBundleForTrustDomain(td); err != nil {
		t.Errorf("BundleSource: %v", err)
	}

	refused := func(what, token, aud, want string) {
		t.Helper()
		_, err := client.ValidateJWTSVID(ctx, token, aud)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want InvalidArgument saying %q", what, err, want)
		}
	}
	refused("another audience", svid.Marshal(), "other", "audience")
	refused("junk", "not.a.jwt", "db", "unable to parse")

	// A token signed by a key of meshid's, expired.
	past := time.Now().Add(-time.Hour)
	old, err := jwtsvid.New(jwtsvid.Config{Store: &jwtsvid.File{Path: filepath.Join(t.TempDir(), "k")},
		Policy: jwtsvid.Policy{Rotation: 24 * time.Hour, MaxTTL: time.Hour}, Now: func() time.Time { return past }})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	expired, err := old.Sign(id, []string{"db"}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	both := c.JWTAuthorities()
	for kid, k := range old.Published() {
		both[kid] = k
	}
	bundle.SetJWTAuthorities(both)
	refused("expired", expired.Token, "db", "expired")

	// The peer's token: refused until federated, taken while federated.
	peerToken, err := peerCA.SignJWT(spiffeid.RequireFromPath(other, "/ns/pay/sa/api").String(), []string{"db"})
	if err != nil {
		t.Fatal(err)
	}
	refused("a foreign trust domain's token", peerToken.Token, "db", "no bundle found")
	peerBundle := spiffebundle.New(other)
	for kid, k := range peerCA.JWTAuthorities() {
		peerBundle.AddJWTAuthority(kid, k)
	}
	updates := make(chan *jwtbundle.Set, 16)
	go client.WatchJWTBundles(ctx, jwtWatcher(updates))
	bundle.SetFederated(map[spiffeid.TrustDomain]*spiffebundle.Bundle{other: peerBundle})
	waitJWTBundles := func(what string, ok func(*jwtbundle.Set) bool) {
		t.Helper()
		for {
			select {
			case set := <-updates:
				if ok(set) {
					return
				}
			case <-ctx.Done():
				t.Fatalf("FetchJWTBundles never sent %s", what)
			}
		}
	}
	waitJWTBundles("the peer's keys beside the own", func(set *jwtbundle.Set) bool { return set.Has(other) && set.Has(td) })
	if got, err := client.ValidateJWTSVID(ctx, peerToken.Token, "db"); err != nil || got.ID.TrustDomain() != other {
		t.Errorf("the federated peer's token: %v, %v", got, err)
	}
	// meshid's own keys still cannot be forged by the peer: a token the
	// peer signs for a meshid identity is refused.
	forged, err := peerCA.SignJWT(id.String(), []string{"db"})
	if err != nil {
		t.Fatal(err)
	}
	refused("the peer signing for meshid's trust domain", forged.Token, "db", "no JWT authority")
	bundle.SetFederated(nil)
	waitJWTBundles("the peer's keys gone", func(set *jwtbundle.Set) bool { return !set.Has(other) })
	refused("a token of a trust domain no longer federated", peerToken.Token, "db", "no bundle found")
}

type jwtWatcher chan *jwtbundle.Set

func (w jwtWatcher) OnJWTBundlesUpdate(set *jwtbundle.Set) { w <- set }
func (w jwtWatcher) OnJWTBundlesWatchError(error)          {}

func TestJWTRequestsChecked(t *testing.T) {
	c := catest.New(t)
	id := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	addr := serve(t, c, id, time.Hour)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	wl := workload.NewSpiffeWorkloadAPIClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := wl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"db"}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("no security header: %v", err)
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	for _, tc := range []struct {
		name string
		req  *workload.JWTSVIDRequest
		code codes.Code
	}{
		{"no audience", &workload.JWTSVIDRequest{}, codes.InvalidArgument},
		{"another identity", &workload.JWTSVIDRequest{Audience: []string{"db"}, SpiffeId: "spiffe://cluster.local/ns/shop/sa/admin"}, codes.PermissionDenied},
		{"an empty audience", &workload.JWTSVIDRequest{Audience: []string{""}}, codes.InvalidArgument},
	} {
		if _, err := wl.FetchJWTSVID(ctx, tc.req); status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.code)
		}
	}
	if _, err := wl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Svid: "x"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("validate with no audience: %v", err)
	}
	if _, err := wl.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "db"}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("validate with no token: %v", err)
	}
}
