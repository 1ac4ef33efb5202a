package jwtsvid_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	gojwtsvid "github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/meshid/meshid/ca/jwtsvid"
)

var (
	td = spiffeid.RequireTrustDomainFromString("cluster.local")
	id = spiffeid.RequireFromPath(td, "/ns/demo/sa/web")
)

// clock is a settable time, shared by the Keys of a test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

var policy = jwtsvid.Policy{Rotation: time.Hour, MaxTTL: 10 * time.Minute}

func newKeys(t *testing.T, store jwtsvid.Store, c *clock) *jwtsvid.Keys {
	t.Helper()
	k, err := jwtsvid.New(jwtsvid.Config{Store: store, Policy: policy, Now: c.Now})
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// spiffeValidate checks token as go-spiffe does, with k's published keys
// and the real time.
func spiffeValidate(t *testing.T, k *jwtsvid.Keys, token string, aud string) (*gojwtsvid.SVID, error) {
	t.Helper()
	b := jwtbundle.New(td)
	for kid, pub := range k.Published() {
		if err := b.AddJWTAuthority(kid, pub); err != nil {
			t.Fatal(err)
		}
	}
	return gojwtsvid.ParseAndValidate(token, b, []string{aud})
}

// validate checks token's signature against k's published keys and its
// claims at the clock's time (go-spiffe's check reads the real time).
func validate(t *testing.T, k *jwtsvid.Keys, c *clock, token string, aud string) error {
	t.Helper()
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return err
	}
	pub, ok := k.Published()[tok.Headers[0].KeyID]
	if !ok {
		return errors.New("no published key for the token's kid")
	}
	var claims jwt.Claims
	if err := tok.Claims(pub, &claims); err != nil {
		return err
	}
	return claims.ValidateWithLeeway(jwt.Expected{AnyAudience: jwt.Audience{aud}, Time: c.Now()}, 0)
}

func TestRotationSchedule(t *testing.T) {
	c := &clock{t: time.Now()}
	k := newKeys(t, &jwtsvid.File{Path: filepath.Join(t.TempDir(), "jwt-keys.json")}, c)
	if _, err := k.Sign(id, []string{"a"}, 0); !errors.Is(err, jwtsvid.ErrNoKey) {
		t.Fatalf("Sign before Sync: %v, want ErrNoKey", err)
	}
	changes := 0
	k.OnChange(func() { changes++ })
	ctx := context.Background()
	sync := func() {
		t.Helper()
		if err := k.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	sync()
	first := k.Active()
	if first == nil || len(k.Published()) != 1 || changes != 1 {
		t.Fatalf("first start: active %v, %d published, %d changes; want one key, active", first, len(k.Published()), changes)
	}
	old, err := k.Sign(id, []string{"a"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := old.Expiry.Sub(old.IssuedAt); got != jwtsvid.DefaultTTL {
		t.Errorf("default lifetime %v, want %v", got, jwtsvid.DefaultTTL)
	}

	// Half way: the successor is published, and does not sign yet.
	c.Add(policy.Rotation / 2)
	sync()
	if len(k.Published()) != 2 || k.Active().ID != first.ID || changes != 2 {
		t.Fatalf("half way: %d published, active %s (first %s), %d changes; want the successor published, not active", len(k.Published()), k.Active().ID, first.ID, changes)
	}
	// A token signed before is still good, and so is one signed now.
	c.Add(policy.Rotation/2 - time.Minute)
	last, err := k.Sign(id, []string{"a"}, time.Hour) // clamped to MaxTTL
	if err != nil {
		t.Fatal(err)
	}
	if got := last.Expiry.Sub(last.IssuedAt); got != policy.MaxTTL {
		t.Errorf("lifetime asked 1h: %v, want MaxTTL %v", got, policy.MaxTTL)
	}

	// The successor signs from the first key's end.
	c.Add(time.Minute)
	sync()
	second := k.Active()
	if second.ID == first.ID {
		t.Fatal("the first key still signs after its rotation period")
	}
	if err := validate(t, k, c, last.Token, "a"); err != nil {
		t.Fatalf("a token the retired key signed, still live: %v", err)
	}
	// Once the last token the first key signed has expired, the first is
	// dropped.
	c.Add(policy.MaxTTL + jwtsvid.ClockSkew)
	sync()
	pub := k.Published()
	if _, ok := pub[first.ID]; ok {
		t.Errorf("the first key is published after its tokens all expired")
	}
	if _, ok := pub[second.ID]; !ok {
		t.Errorf("the active key is not published")
	}
	now, err := k.Sign(id, []string{"a", "b"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate(t, k, c, now.Token, "b"); err != nil {
		t.Fatal(err)
	}
	if now.KeyID != second.ID {
		t.Errorf("signed by %s; want %s", now.KeyID, second.ID)
	}
}

// A CA down longer than a rotation period comes back with a key that
// signs at once.
func TestLongOutage(t *testing.T) {
	c := &clock{t: time.Now()}
	store := &jwtsvid.File{Path: filepath.Join(t.TempDir(), "jwt-keys.json")}
	if err := newKeys(t, store, c).Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.Add(10 * policy.Rotation)
	k := newKeys(t, store, c)
	if err := k.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if k.Active() == nil || len(k.Published()) != 1 {
		t.Fatalf("after an outage: active %v, %d published; want one fresh key", k.Active(), len(k.Published()))
	}
}

// Replicas syncing at once on one store end with one active key.
func TestReplicasShareOneKey(t *testing.T) {
	c := &clock{t: time.Now()}
	store := &jwtsvid.File{Path: filepath.Join(t.TempDir(), "jwt-keys.json")}
	replicas := make([]*jwtsvid.Keys, 4)
	var wg sync.WaitGroup
	errs := make([]error, len(replicas))
	for i := range replicas {
		replicas[i] = newKeys(t, &lockedStore{Store: store}, c)
		wg.Go(func() { errs[i] = replicas[i].Sync(context.Background()) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	for i, r := range replicas {
		if r.Active().ID != replicas[0].Active().ID {
			t.Errorf("replica %d signs with %s, replica 0 with %s", i, r.Active().ID, replicas[0].Active().ID)
		}
	}
}

// lockedStore makes File's check-then-write atomic among the goroutines of
// a test, as the API server's resourceVersion does for the Secret.
type lockedStore struct{ jwtsvid.Store }

var storeMu sync.Mutex

func (s *lockedStore) Save(ctx context.Context, version string, data []byte) error {
	storeMu.Lock()
	defer storeMu.Unlock()
	return s.Store.Save(ctx, version, data)
}

// A stored set that does not parse is left alone, and the keys held stay
// in use.
func TestUnreadableStoreKept(t *testing.T) {
	c := &clock{t: time.Now()}
	path := filepath.Join(t.TempDir(), "jwt-keys.json")
	k := newKeys(t, &jwtsvid.File{Path: path}, c)
	if err := k.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	held := k.Active().ID
	junk := []byte(`{"keys":[{"kid":"x","private_key":"nope"}]}`)
	if err := os.WriteFile(path, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	c.Add(policy.Rotation) // a rotation is due, and must not be written
	if err := k.Sync(context.Background()); err == nil {
		t.Fatal("Sync of an unreadable set: no error")
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, junk) {
		t.Errorf("the unreadable set was overwritten")
	}
	if _, ok := k.Published()[held]; !ok {
		t.Errorf("the keys held were dropped")
	}
}

func TestSignRefusesBadAudiences(t *testing.T) {
	c := &clock{t: time.Now()}
	k := newKeys(t, &jwtsvid.File{Path: filepath.Join(t.TempDir(), "k")}, c)
	if err := k.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	long := string(bytes.Repeat([]byte("a"), jwtsvid.MaxAudienceLength+1))
	many := make([]string, jwtsvid.MaxAudiences+1)
	for i := range many {
		many[i] = "a"
	}
	for name, aud := range map[string][]string{
		"none": nil, "empty": {""}, "too long": {long}, "too many": many, "not UTF-8": {"\xff"},
	} {
		if _, err := k.Sign(id, aud, 0); !errors.Is(err, jwtsvid.ErrBadAudience) {
			t.Errorf("%s: %v, want ErrBadAudience", name, err)
		}
	}
	svid, err := k.Sign(id, []string{"x"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := spiffeValidate(t, k, svid.Token, "x")
	if err != nil {
		t.Fatalf("go-spiffe refuses the token: %v", err)
	}
	if got.ID != id || !got.Expiry.Equal(svid.Expiry) {
		t.Errorf("go-spiffe read %s until %v; want %s until %v", got.ID, got.Expiry, id, svid.Expiry)
	}
	if _, err := spiffeValidate(t, k, svid.Token, "y"); err == nil {
		t.Error("a token for audience x validated for y")
	}
	c.Add(jwtsvid.DefaultTTL + time.Second)
	if err := validate(t, k, c, svid.Token, "x"); err == nil {
		t.Error("an expired token validated")
	}
}

func TestParseRefuses(t *testing.T) {
	c := &clock{t: time.Now()}
	path := filepath.Join(t.TempDir(), "k")
	k := newKeys(t, &jwtsvid.File{Path: path}, c)
	if err := k.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.Parse(good); err != nil {
		t.Fatalf("Parse of what was stored: %v", err)
	}
	kid := k.Active().ID
	for name, data := range map[string][]byte{
		"not JSON":  []byte("{"),
		"wrong kid": bytes.Replace(good, []byte(kid), []byte("AAAA"), 1),
		"twice":     bytes.Replace(good, []byte(`]}`), append([]byte(","), good[len(`{"keys":[`):]...), 1),
		"times":     bytes.Replace(good, []byte(`"signs_until":"`), []byte(`"signs_until":"1`), 1),
	} {
		if _, err := jwtsvid.Parse(data); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func FuzzParseJWTKeys(f *testing.F) {
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"keys":[{"kid":"a","private_key":"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := jwtsvid.Parse(data)
		if err != nil {
			return
		}
		out, err := s.Marshal()
		if err != nil {
			t.Fatalf("a parsed set does not marshal: %v", err)
		}
		if _, err := jwtsvid.Parse(out); err != nil {
			t.Fatalf("a marshalled set does not parse: %v", err)
		}
	})
}
