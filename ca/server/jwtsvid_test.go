package server

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	gojwtsvid "github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/ca/jwtsvid/jwtsvidpb"
	"github.com/meshid/meshid/ca/ledger"
)

func newJWTKeys(t *testing.T, sync bool) *jwtsvid.Keys {
	t.Helper()
	k, err := jwtsvid.New(jwtsvid.Config{
		Store:  &jwtsvid.File{Path: filepath.Join(t.TempDir(), "jwt-keys.json")},
		Policy: jwtsvid.Policy{Rotation: time.Hour, MaxTTL: 10 * time.Minute},
	})
	if err != nil {
		t.Fatal(err)
	}
	if sync {
		if err := k.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	return k
}

func (e *env) mint(token string, req *jwtsvidpb.MintJWTSVIDRequest) (*jwtsvidpb.MintJWTSVIDResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	return jwtsvidpb.NewJWTSVIDServiceClient(e.conn).MintJWTSVID(ctx, req)
}

func TestMintJWTSVID(t *testing.T) {
	keys := newJWTKeys(t, true)
	e := newEnv(t, envOptions{jwt: keys})
	resp, err := e.mint(e.token(t, "demo", "web"), &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"spiffe://other.example/db", "aws"}, TtlSeconds: 120})
	if err != nil {
		t.Fatal(err)
	}
	if resp.SpiffeId != webID.String() || resp.ExpiresAt-resp.IssuedAt != 120 {
		t.Errorf("minted for %s, %d s; want %s, 120 s", resp.SpiffeId, resp.ExpiresAt-resp.IssuedAt, webID)
	}
	// go-spiffe's own validation, with the keys meshid publishes.
	bundle := jwtbundle.New(td)
	for kid, pub := range keys.Published() {
		bundle.AddJWTAuthority(kid, pub)
	}
	svid, err := gojwtsvid.ParseAndValidate(resp.Token, bundle, []string{"aws"})
	if err != nil {
		t.Fatalf("go-spiffe refuses the JWT-SVID: %v", err)
	}
	if svid.ID != webID || svid.Expiry.Unix() != resp.ExpiresAt {
		t.Errorf("go-spiffe read %s until %v", svid.ID, svid.Expiry)
	}
	if got := testutil.ToFloat64(e.metrics.jwtRequests.WithLabelValues("OK")); got != 1 {
		t.Errorf("meshid_ca_jwt_svid_requests_total{code=OK} = %v, want 1", got)
	}
	logs := e.logs.String()
	if !strings.Contains(logs, `"msg":"JWT-SVID issued"`) || !strings.Contains(logs, `"kid":"`) {
		t.Errorf("no issuance log line: %s", logs)
	}
	assertNoSecrets(t, logs)
}

func TestMintJWTSVIDRefusals(t *testing.T) {
	e := newEnv(t, envOptions{jwt: newJWTKeys(t, true)})
	good := e.token(t, "demo", "web")
	e.denied.Deny(ledger.Denial{SPIFFEID: "spiffe://cluster.local/ns/demo/sa/banned", Reason: "test", At: time.Now()})
	for _, tc := range []struct {
		name  string
		token string
		req   *jwtsvidpb.MintJWTSVIDRequest
		code  codes.Code
	}{
		{"no token", "", &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"a"}}, codes.Unauthenticated},
		{"wrong token audience", e.token(t, "demo", "web", "other"), &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"a"}}, codes.Unauthenticated},
		{"no audience", good, &jwtsvidpb.MintJWTSVIDRequest{}, codes.InvalidArgument},
		{"empty audience", good, &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{""}}, codes.InvalidArgument},
		{"negative ttl", good, &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"a"}, TtlSeconds: -1}, codes.InvalidArgument},
		{"denied", e.token(t, "demo", "banned"), &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"a"}}, codes.PermissionDenied},
		{"impersonation without node proxies", good, &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"a"}, ImpersonatedIdentity: "spiffe://cluster.local/ns/demo/sa/api"}, codes.PermissionDenied},
	} {
		_, err := e.mint(tc.token, tc.req)
		if status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %s", tc.name, err, tc.code)
		}
	}
	if got := testutil.ToFloat64(e.metrics.jwtRequests.WithLabelValues("OK")); got != 0 {
		t.Errorf("%v minted", got)
	}
	assertNoSecrets(t, e.logs.String())

	// No key loaded yet: Unavailable, for the client to retry.
	e = newEnv(t, envOptions{jwt: newJWTKeys(t, false)})
	if _, err := e.mint(e.token(t, "demo", "web"), &jwtsvidpb.MintJWTSVIDRequest{Audience: []string{"a"}}); status.Code(err) != codes.Unavailable {
		t.Errorf("no key: %v, want Unavailable", err)
	}
}
