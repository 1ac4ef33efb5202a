package jwtsvid

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Key is one JWT signing key and its schedule: it is published from the
// moment it is made, signs from Activates until SignsUntil, and stays
// published until PublishedUntil, when the last token it signed has
// expired.
type Key struct {
	ID             string
	Signer         *ecdsa.PrivateKey
	Created        time.Time
	Activates      time.Time
	SignsUntil     time.Time
	PublishedUntil time.Time
}

// Public is the key's public half.
func (k *Key) Public() crypto.PublicKey { return k.Signer.Public() }

// signsAt says whether k is the key for tokens signed at t.
func (k *Key) signsAt(t time.Time) bool {
	return !t.Before(k.Activates) && t.Before(k.SignsUntil)
}

// Policy is the rotation schedule.
type Policy struct {
	// Rotation is how long each key signs; a key is published half of
	// that before it starts.
	Rotation time.Duration
	// MaxTTL is the longest a token lives: a retired key stays published
	// that long, plus ClockSkew, after it stops signing.
	MaxTTL time.Duration
}

// ClockSkew is how far verifiers' clocks may be off: a retired key is
// published that much longer than the tokens it signed can live.
const ClockSkew = 5 * time.Minute

func (p Policy) check() error {
	if p.Rotation < 2*time.Minute {
		return fmt.Errorf("jwtsvid: key rotation %v is under 2m", p.Rotation)
	}
	if p.MaxTTL <= 0 || p.MaxTTL > p.Rotation {
		return fmt.Errorf("jwtsvid: maximum token lifetime %v must be positive and at most the key rotation %v", p.MaxTTL, p.Rotation)
	}
	return nil
}

// KeySet is the JWT keys in use, oldest first. A KeySet is never changed
// once built: Rotate returns a new one.
type KeySet struct {
	keys []*Key
}

// Keys returns the keys, oldest first; callers must not modify them.
func (s *KeySet) Keys() []*Key {
	if s == nil {
		return nil
	}
	return s.keys
}

// Active is the key that signs at now, or nil.
func (s *KeySet) Active(now time.Time) *Key {
	// The newest key that signs now: during a hand-over both may.
	for _, k := range slices.Backward(s.Keys()) {
		if k.signsAt(now) {
			return k
		}
	}
	return nil
}

// Published are the keys verifiers must hold at now, by kid.
func (s *KeySet) Published(now time.Time) map[string]crypto.PublicKey {
	out := map[string]crypto.PublicKey{}
	for _, k := range s.Keys() {
		if now.Before(k.PublishedUntil) {
			out[k.ID] = k.Public()
		}
	}
	return out
}

// NextChange is when Rotate next has something to do.
func (s *KeySet) NextChange(p Policy) time.Time {
	var next time.Time
	earliest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	keys := s.Keys()
	for _, k := range keys {
		earliest(k.PublishedUntil)
	}
	if n := len(keys); n > 0 {
		last := keys[n-1]
		earliest(last.SignsUntil.Add(-p.Rotation / 2)) // the successor is due
	}
	return next
}

// Rotate returns the set as it should be at now under p: keys no longer
// published dropped, a successor made once the newest key is past half its
// signing time (it signs when that one stops), and, if no key signs now
// (a first start, or a CA down for longer than a rotation), a key that
// signs at once. changed is false when the set is already right; then
// the same set is returned.
func (s *KeySet) Rotate(now time.Time, p Policy) (next *KeySet, changed bool, err error) {
	if err := p.check(); err != nil {
		return nil, false, err
	}
	keys := slices.DeleteFunc(slices.Clone(s.Keys()), func(k *Key) bool { return !now.Before(k.PublishedUntil) })
	changed = len(keys) != len(s.Keys())
	if active := (&KeySet{keys: keys}).Active(now); active == nil {
		k, err := newKey(now, now, p)
		if err != nil {
			return nil, false, err
		}
		// Keys that were to sign later are superseded; they stay
		// published until their time is up.
		keys, changed = append(keys, k), true
	}
	last := keys[len(keys)-1]
	if !now.Before(last.SignsUntil.Add(-p.Rotation / 2)) {
		k, err := newKey(now, last.SignsUntil, p)
		if err != nil {
			return nil, false, err
		}
		keys, changed = append(keys, k), true
	}
	if !changed {
		return s, false, nil
	}
	slices.SortStableFunc(keys, func(a, b *Key) int { return a.Activates.Compare(b.Activates) })
	return &KeySet{keys: keys}, true, nil
}

func newKey(now, activates time.Time, p Policy) (*Key, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("jwtsvid: generating a key: %w", err)
	}
	id, err := keyID(priv.Public())
	if err != nil {
		return nil, err
	}
	until := activates.Add(p.Rotation)
	return &Key{
		ID:             id,
		Signer:         priv,
		Created:        now,
		Activates:      activates,
		SignsUntil:     until,
		PublishedUntil: until.Add(p.MaxTTL + ClockSkew),
	}, nil
}

// keyID is the kid of pub: the base64url SHA-256 of its DER
// SubjectPublicKeyInfo, stable and distinct for every key.
func keyID(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", fmt.Errorf("jwtsvid: %w", err)
	}
	sum := sha256.Sum256(der)
	return base64.RawURLEncoding.EncodeToString(sum[:20]), nil
}

// keyJSON is a key as stored: the private key as PKCS #8 PEM.
type keyJSON struct {
	ID             string    `json:"kid"`
	PrivateKey     string    `json:"private_key"`
	Created        time.Time `json:"created"`
	Activates      time.Time `json:"activates"`
	SignsUntil     time.Time `json:"signs_until"`
	PublishedUntil time.Time `json:"published_until"`
}

type setJSON struct {
	Keys []keyJSON `json:"keys"`
}

// Marshal encodes the set as stored, private keys included.
func (s *KeySet) Marshal() ([]byte, error) {
	out := setJSON{Keys: []keyJSON{}}
	for _, k := range s.Keys() {
		der, err := x509.MarshalPKCS8PrivateKey(k.Signer)
		if err != nil {
			return nil, fmt.Errorf("jwtsvid: encoding key %s: %w", k.ID, err)
		}
		out.Keys = append(out.Keys, keyJSON{
			ID:             k.ID,
			PrivateKey:     string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
			Created:        k.Created.UTC(),
			Activates:      k.Activates.UTC(),
			SignsUntil:     k.SignsUntil.UTC(),
			PublishedUntil: k.PublishedUntil.UTC(),
		})
	}
	return json.Marshal(out)
}

// maxKeys bounds a stored set: a handful are ever in use at once.
const maxKeys = 64

// Parse decodes a stored set. Every key must be a P-256 key whose kid is
// its own and whose times are in order, or the whole set is refused: a
// store that does not read back as written is not to be signed from.
func Parse(data []byte) (*KeySet, error) {
	var in setJSON
	if err := json.Unmarshal(data, &in); err != nil {
		return nil, fmt.Errorf("jwtsvid: key set: %w", err)
	}
	if len(in.Keys) > maxKeys {
		return nil, fmt.Errorf("jwtsvid: key set holds %d keys; at most %d", len(in.Keys), maxKeys)
	}
	s := &KeySet{}
	seen := map[string]bool{}
	for i, kj := range in.Keys {
		k, err := parseKey(kj)
		if err != nil {
			return nil, fmt.Errorf("jwtsvid: key set: key %d: %w", i, err)
		}
		if seen[k.ID] {
			return nil, fmt.Errorf("jwtsvid: key set: key %s twice", k.ID)
		}
		seen[k.ID] = true
		s.keys = append(s.keys, k)
	}
	slices.SortStableFunc(s.keys, func(a, b *Key) int { return a.Activates.Compare(b.Activates) })
	return s, nil
}

func parseKey(kj keyJSON) (*Key, error) {
	block, _ := pem.Decode([]byte(kj.PrivateKey))
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("private_key is not a PKCS #8 PEM block")
	}
	parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("private_key: %w", err)
	}
	priv, ok := parsed.(*ecdsa.PrivateKey)
	if !ok || priv.Curve != elliptic.P256() {
		return nil, errors.New("private_key is not a P-256 ECDSA key")
	}
	id, err := keyID(priv.Public())
	if err != nil {
		return nil, err
	}
	if kj.ID != id {
		return nil, fmt.Errorf("kid %q is not the key's (%s)", clip(kj.ID), id)
	}
	if kj.Activates.Before(kj.Created) || !kj.SignsUntil.After(kj.Activates) || kj.PublishedUntil.Before(kj.SignsUntil) {
		return nil, fmt.Errorf("key %s: times out of order (created, activates, signs_until, published_until)", id)
	}
	return &Key{ID: id, Signer: priv, Created: kj.Created, Activates: kj.Activates, SignsUntil: kj.SignsUntil, PublishedUntil: kj.PublishedUntil}, nil
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
