package jwtsvid

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults.
const (
	DefaultRotation = 24 * time.Hour
	DefaultTTL      = 5 * time.Minute
	DefaultMaxTTL   = time.Hour
)

// Limits on what a token may be asked for.
const (
	MaxAudiences      = 16
	MaxAudienceLength = 256
)

// Typed refusals: callers turn them into their own errors.
var (
	ErrNoKey       = errors.New("jwtsvid: no JWT signing key loaded yet")
	ErrBadAudience = errors.New("jwtsvid: bad audience")
)

// Keys is the live key set: it signs with the active key, publishes the
// set, and keeps it rotated and in step with the Store, which other
// replicas may change. Safe for concurrent use.
type Keys struct {
	store  Store
	policy Policy
	ttl    time.Duration
	log    *slog.Logger
	now    func() time.Time

	mu        sync.Mutex
	set       *KeySet
	published map[string]crypto.PublicKey
	onChange  []func()
}

// Config configures [New].
type Config struct {
	Store  Store
	Policy Policy
	// TTL is a token's lifetime when the request names none; at most
	// Policy.MaxTTL. Default DefaultTTL, or MaxTTL if that is shorter.
	TTL time.Duration
	Log *slog.Logger
	Now func() time.Time
}

// New checks cfg; call Sync (and then Run) to load the keys.
func New(cfg Config) (*Keys, error) {
	if cfg.Store == nil {
		return nil, errors.New("jwtsvid: config needs a store")
	}
	if err := cfg.Policy.check(); err != nil {
		return nil, err
	}
	k := &Keys{store: cfg.Store, policy: cfg.Policy, ttl: cfg.TTL, log: cfg.Log, now: cfg.Now}
	if k.ttl <= 0 {
		k.ttl = min(DefaultTTL, cfg.Policy.MaxTTL)
	}
	if k.ttl > cfg.Policy.MaxTTL {
		return nil, fmt.Errorf("jwtsvid: token lifetime %v is over the maximum %v", k.ttl, cfg.Policy.MaxTTL)
	}
	if k.log == nil {
		k.log = slog.New(slog.DiscardHandler)
	}
	if k.now == nil {
		k.now = time.Now
	}
	return k, nil
}

// OnChange calls f after every change of the published keys (a new key, a
// retired one dropped), for whoever distributes them.
func (k *Keys) OnChange(f func()) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.onChange = append(k.onChange, f)
}

// Sync reads the stored set, rotates it if it is due, and stores the
// result. A stored set that does not parse is never overwritten: the keys
// held stay in use (none on a first Sync) and the error says why.
func (k *Keys) Sync(ctx context.Context) error {
	for range 3 {
		err := k.syncOnce(ctx)
		if !errors.Is(err, ErrStale) {
			return err
		}
		// Another replica rotated first: take its set.
	}
	return fmt.Errorf("jwtsvid: the stored key set kept changing: %w", ErrStale)
}

func (k *Keys) syncOnce(ctx context.Context) error {
	data, version, err := k.store.Load(ctx)
	if err != nil {
		return err
	}
	set := &KeySet{}
	if data != nil {
		if set, err = Parse(data); err != nil {
			return fmt.Errorf("jwtsvid: the stored key set is unreadable and left as it is (the keys held stay in use): %w", err)
		}
	}
	now := k.now()
	next, changed, err := set.Rotate(now, k.policy)
	if err != nil {
		return err
	}
	if changed {
		out, err := next.Marshal()
		if err != nil {
			return err
		}
		if err := k.store.Save(ctx, version, out); err != nil {
			return err
		}
		if a := next.Active(now); a != nil {
			k.log.Info("JWT signing keys rotated", "active_kid", a.ID, "keys", len(next.Keys()), "signs_until", a.SignsUntil.UTC())
		}
	}
	k.use(next)
	return nil
}

func (k *Keys) use(set *KeySet) {
	published := set.Published(k.now())
	k.mu.Lock()
	k.set = set
	same := maps.EqualFunc(k.published, published, func(a, b crypto.PublicKey) bool {
		return a.(interface{ Equal(crypto.PublicKey) bool }).Equal(b)
	})
	k.published = published
	var fire []func()
	if !same {
		fire = append(fire, k.onChange...)
	}
	k.mu.Unlock()
	for _, f := range fire {
		f()
	}
}

// Run keeps the set rotated and in step with the store until ctx ends:
// it syncs when a change is due and every interval, to see other
// replicas' changes.
func (k *Keys) Run(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = time.Minute
	}
	for {
		wait := interval
		k.mu.Lock()
		set := k.set
		k.mu.Unlock()
		if set != nil {
			if due := set.NextChange(k.policy).Sub(k.now()); due < wait {
				wait = max(due, time.Second)
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := k.Sync(ctx); err != nil && ctx.Err() == nil {
			k.log.Error("JWT signing keys not synced; retrying", "error", err)
		}
	}
}

// Published returns the keys verifiers must hold now, by kid.
func (k *Keys) Published() map[string]crypto.PublicKey {
	k.mu.Lock()
	defer k.mu.Unlock()
	return maps.Clone(k.published)
}

// Active is the key that signs now, or nil.
func (k *Keys) Active() *Key {
	k.mu.Lock()
	set := k.set
	k.mu.Unlock()
	return set.Active(k.now())
}

// SVID is a signed JWT-SVID.
type SVID struct {
	Token    string
	ID       spiffeid.ID
	Audience []string
	KeyID    string
	IssuedAt time.Time
	Expiry   time.Time
}

// CheckAudience validates the audiences of a request: at least one, at
// most MaxAudiences, each non-empty UTF-8 of at most MaxAudienceLength
// bytes. Errors wrap ErrBadAudience.
func CheckAudience(audience []string) error {
	switch {
	case len(audience) == 0:
		return fmt.Errorf("%w: at least one audience is required", ErrBadAudience)
	case len(audience) > MaxAudiences:
		return fmt.Errorf("%w: %d audiences; at most %d", ErrBadAudience, len(audience), MaxAudiences)
	}
	for i, a := range audience {
		switch {
		case a == "":
			return fmt.Errorf("%w: audience %d is empty", ErrBadAudience, i)
		case len(a) > MaxAudienceLength:
			return fmt.Errorf("%w: audience %d is %d bytes; at most %d", ErrBadAudience, i, len(a), MaxAudienceLength)
		case !utf8.ValidString(a):
			return fmt.Errorf("%w: audience %d is not UTF-8", ErrBadAudience, i)
		}
	}
	return nil
}

// Sign makes a JWT-SVID for id with audience, living ttl (0: the default;
// clamped to the maximum), signed by the active key.
func (k *Keys) Sign(id spiffeid.ID, audience []string, ttl time.Duration) (*SVID, error) {
	if id.IsZero() {
		return nil, errors.New("jwtsvid: no SPIFFE ID to sign for")
	}
	if err := CheckAudience(audience); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		ttl = k.ttl
	}
	ttl = min(ttl, k.policy.MaxTTL)
	now := k.now()
	key := k.Active()
	if key == nil {
		return nil, ErrNoKey
	}
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key.Signer, KeyID: key.ID}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("jwtsvid: %w", err)
	}
	// Whole seconds, as the claims carry them.
	iat := now.Truncate(time.Second)
	exp := iat.Add(ttl)
	token, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  id.String(),
		Audience: jwt.Audience(audience),
		IssuedAt: jwt.NewNumericDate(iat),
		Expiry:   jwt.NewNumericDate(exp),
	}).Serialize()
	if err != nil {
		return nil, fmt.Errorf("jwtsvid: signing: %w", err)
	}
	return &SVID{Token: token, ID: id, Audience: audience, KeyID: key.ID, IssuedAt: iat, Expiry: exp}, nil
}
