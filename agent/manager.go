package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/big"
	mathrand "math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca"
)

// Signer is the CA as the agent sees it; *CAClient is one. Sign returns
// the leaf first and the root last; during a root rotation the chain may end
// with every root the CA trusts, of which the agent keeps the one that
// issued the certificate before them.
type Signer interface {
	Sign(ctx context.Context, csrPEM []byte, token string, ttl time.Duration) ([]*x509.Certificate, error)
}

// TokenSource gives a workload's current service-account token. It is asked
// afresh for every request, since kubelet rotates projected tokens.
type TokenSource interface {
	Token() (string, error)
}

// TokenFile reads the token from a file (a projected token mount).
type TokenFile string

// Token reads the file.
func (f TokenFile) Token() (string, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return "", fmt.Errorf("agent: reading token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("agent: token file %s is empty", string(f))
	}
	return tok, nil
}

// StaticToken is a token known in advance, as one an SDS stream presents.
type StaticToken string

// Token returns the token.
func (t StaticToken) Token() (string, error) { return string(t), nil }

// KeyType is the workload key algorithm.
type KeyType string

// Workload key types.
const (
	ECDSAP256 KeyType = "ecdsa-p256"
	RSA2048   KeyType = "rsa-2048"
)

// NewKey makes a private key of type kt. Keys are made on the node and never
// leave it: only CSRs do.
func NewKey(kt KeyType) (crypto.Signer, error) {
	switch kt {
	case ECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return nil, fmt.Errorf("agent: unknown key type %q (want %s or %s)", kt, ECDSAP256, RSA2048)
}

// SVID is a workload's certificate with its key. It never changes once
// made. It keeps them encoded, not parsed: a node agent holds one per
// identity, and a parsed certificate and key cost kilobytes more each.
type SVID struct {
	ID        spiffeid.ID
	Serial    *big.Int
	NotBefore time.Time
	NotAfter  time.Time
	Root      *x509.Certificate // the root the CA answered with

	leafDER        []byte
	intermediates  *chainTail // shared by every identity the same CA signed
	keyDER, keyPEM []byte
}

// chainTail is the CA certificates between a leaf and the root, parsed and
// encoded once for all the leaves they sign.
type chainTail struct {
	certs []*x509.Certificate
	pem   []byte
}

func newSVID(id spiffeid.ID, leaf *x509.Certificate, tail *chainTail, key crypto.Signer, root *x509.Certificate) (*SVID, error) {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("agent: encoding key: %w", err)
	}
	return &SVID{ID: id, Serial: leaf.SerialNumber, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter, Root: root,
		leafDER: leaf.Raw, intermediates: tail,
		keyDER: keyDER, keyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}, nil
}

// ChainPEM is the leaf and intermediates, PEM-encoded. It is encoded at
// each call: that costs less than serving it, and a node agent holding a
// thousand identities does not keep a thousand copies.
func (s *SVID) ChainPEM() []byte {
	leaf := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.leafDER})
	return append(leaf, s.intermediates.pem...)
}

// ChainDER is the leaf and intermediates, DER-encoded one after the other
// (the Workload API's form).
func (s *SVID) ChainDER() []byte {
	out := slices.Clone(s.leafDER)
	for _, c := range s.intermediates.certs {
		out = append(out, c.Raw...)
	}
	return out
}

// Certificates parses the leaf anew and returns it with the intermediates.
func (s *SVID) Certificates() []*x509.Certificate {
	leaf, err := x509.ParseCertificate(s.leafDER)
	if err != nil {
		panic("agent: an SVID's own leaf does not parse: " + err.Error()) // parsed once already
	}
	return append([]*x509.Certificate{leaf}, s.intermediates.certs...)
}

// Leaf parses the workload's own certificate anew.
func (s *SVID) Leaf() *x509.Certificate { return s.Certificates()[0] }

// KeyPEM is the private key as a PEM "PRIVATE KEY" (PKCS#8); do not modify it.
func (s *SVID) KeyPEM() []byte { return s.keyPEM }

// KeyDER is the private key in PKCS#8 DER; do not modify it.
func (s *SVID) KeyDER() []byte { return s.keyDER }

// PrivateKey parses the key.
func (s *SVID) PrivateKey() crypto.Signer {
	k, err := x509.ParsePKCS8PrivateKey(s.keyDER)
	if err != nil {
		panic("agent: an SVID's own key does not parse: " + err.Error()) // encoded by us
	}
	return k.(crypto.Signer)
}

// Observer hears about every CA exchange, for metrics.
type Observer interface {
	Issued(id spiffeid.ID, svid *SVID, took time.Duration)
	Failed(id spiffeid.ID, err error, took time.Duration)
}

// Config configures a Manager.
type Config struct {
	Signer Signer
	// JWT mints JWT-SVIDs; nil: none are served.
	JWT      JWTMinter
	KeyType  KeyType       // default ECDSAP256
	TTL      time.Duration // asked of the CA; 0 lets the CA choose
	Rotation Rotation      // default DefaultRotation
	Backoff  Backoff       // default DefaultBackoff
	// RequestTimeout bounds one CA request (default 10s).
	RequestTimeout time.Duration
	// Rand returns numbers in [0, 1) for jitter (default math/rand/v2).
	Rand func() float64
	// Now is this node's clock (default time.Now). Renewal follows the
	// CA's clock, learnt from its certificates when this one is behind.
	Now      func() time.Time
	Log      *slog.Logger
	Observer Observer
}

// Manager keeps one certificate per identity in use, renewing it at its
// rotation time and retrying failures with backoff, while the current
// certificate keeps being served until it expires.
type Manager struct {
	cfg     Config
	shared  sharedCerts
	ctx     context.Context
	stop    context.CancelFunc
	mu      sync.Mutex
	closed  bool
	entries map[spiffeid.ID]*entry
	wg      sync.WaitGroup
	clock   *caClock
	jwts    jwtCache
}

// NewManager checks cfg and fills in its defaults.
func NewManager(cfg Config) (*Manager, error) {
	if cfg.Signer == nil {
		return nil, errors.New("agent: Config.Signer is required")
	}
	kt, err := ParseKeyType(string(cfg.KeyType))
	if err != nil {
		return nil, err
	}
	cfg.KeyType = kt
	if cfg.TTL < 0 {
		return nil, errors.New("agent: TTL must not be negative")
	}
	if cfg.Rotation == (Rotation{}) {
		cfg.Rotation = DefaultRotation
	}
	if err := cfg.Rotation.Validate(); err != nil {
		return nil, err
	}
	if cfg.Backoff == (Backoff{}) {
		cfg.Backoff = DefaultBackoff
	}
	if cfg.Backoff.Initial <= 0 || cfg.Backoff.Max < cfg.Backoff.Initial {
		return nil, errors.New("agent: backoff needs 0 < Initial <= Max")
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 10 * time.Second
	}
	if cfg.Rand == nil {
		cfg.Rand = mathrand.Float64
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	clock := &caClock{now: cfg.Now, log: cfg.Log}
	clock.obs, _ = cfg.Observer.(ClockObserver)
	ctx, stop := context.WithCancel(context.Background())
	return &Manager{cfg: cfg, ctx: ctx, stop: stop, entries: map[spiffeid.ID]*entry{}, clock: clock}, nil
}

// ParseKeyType accepts "ecdsa-p256" (also the default for "") and "rsa-2048".
func ParseKeyType(s string) (KeyType, error) {
	switch kt := KeyType(s); kt {
	case "":
		return ECDSAP256, nil
	case ECDSAP256, RSA2048:
		return kt, nil
	}
	return "", fmt.Errorf("agent: unknown key type %q (want %s or %s)", s, ECDSAP256, RSA2048)
}

// Acquire returns a handle on id's certificate, starting to fetch it if no
// one holds id yet. tokens proves id to the CA for as long as this handle
// is held: requests use the newest live holder's token, and the next one's
// when the CA refuses it (a holder's pod deleted, its token dead). Release
// the handle when done: an identity no one holds is forgotten.
func (m *Manager) Acquire(id spiffeid.ID, tokens TokenSource) *Handle {
	return m.AcquireUntil(id, tokens, time.Time{})
}

// AcquireUntil is Acquire for a holder whose right to id ends at until (the
// expiry of the token that proved it; zero: no end). Servers close the
// holder's stream then, so the proxy comes back with a fresh token.
func (m *Manager) AcquireUntil(id spiffeid.ID, tokens TokenSource, until time.Time) *Handle {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e != nil {
		e.refs++
		h := &Handle{e: e, until: until, tokens: tokens}
		e.mu.Lock()
		e.holders = append(e.holders, h)
		failing := e.lastErr != nil
		e.mu.Unlock()
		if failing {
			e.now() // a new holder's token may be what was missing
		}
		return h
	}
	ctx, cancel := context.WithCancel(m.ctx)
	e = &entry{m: m, id: id, ctx: ctx, refs: 1, watch: newWatchers(), cancel: cancel}
	h := &Handle{e: e, until: until, tokens: tokens}
	e.holders = []*Handle{h}
	m.entries[id] = e
	e.mu.Lock()
	e.timer = time.AfterFunc(time.Duration(math.MaxInt64), e.tick) // assigned before it can fire
	e.timer.Reset(0)
	e.mu.Unlock()
	if m.closed {
		e.halt() // a closed manager fetches nothing
	}
	return h
}

// Renew asks for a new certificate for id now, if it is held (after a root
// change, or to measure a rotation).
func (m *Manager) Renew(id spiffeid.ID) {
	m.mu.Lock()
	e := m.entries[id]
	m.mu.Unlock()
	if e != nil {
		e.now()
	}
}

// Identities lists the identities held now.
func (m *Manager) Identities() []spiffeid.ID {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]spiffeid.ID, 0, len(m.entries))
	for id := range m.entries {
		ids = append(ids, id)
	}
	return ids
}

// Close stops every renewal and waits for requests in flight.
func (m *Manager) Close() {
	m.stop()
	m.mu.Lock()
	m.closed = true
	for _, e := range m.entries {
		e.halt()
	}
	m.mu.Unlock()
	m.wg.Wait()
}

func (m *Manager) release(h *Handle) {
	e := h.e
	m.mu.Lock()
	defer m.mu.Unlock()
	e.mu.Lock()
	e.holders = slices.DeleteFunc(e.holders, func(x *Handle) bool { return x == h })
	e.mu.Unlock()
	e.refs--
	if e.refs == 0 {
		delete(m.entries, e.id)
		e.halt()
		if f, ok := m.cfg.Observer.(interface{ Forget(spiffeid.ID) }); ok {
			f.Forget(e.id)
		}
	}
}

// Handle is one holder's view of an identity's certificate.
type Handle struct {
	e      *entry
	until  time.Time
	tokens TokenSource // guarded by e.mu
	once   sync.Once
}

// Until is when this holder's right to the identity ends; zero: no end.
func (h *Handle) Until() time.Time { return h.until }

// ID is the identity held.
func (h *Handle) ID() spiffeid.ID { return h.e.id }

// SVID is the current certificate, or nil while there is none (before the
// first answer, or once the last one expired without renewal).
func (h *Handle) SVID() *SVID {
	svid, _ := h.e.current()
	return svid
}

// Changed is closed at the next change of SVID; then call it again.
func (h *Handle) Changed() <-chan struct{} {
	_, ch := h.e.current()
	return ch
}

// OnChange calls f at every change of SVID until stop is called. f runs
// with the identity locked: it must return at once and not call the Handle.
func (h *Handle) OnChange(f func()) (stop func()) {
	e := h.e
	e.mu.Lock()
	defer e.mu.Unlock()
	id := e.watch.add(f)
	return func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.watch.remove(id)
	}
}

// Wait returns the current certificate, waiting for the first one.
func (h *Handle) Wait(ctx context.Context) (*SVID, error) {
	for {
		svid, ch := h.e.current()
		if svid != nil {
			return svid, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			if err := h.e.lastError(); err != nil {
				return nil, fmt.Errorf("agent: no certificate for %s yet: %w (last CA error: %v)", h.e.id, ctx.Err(), err)
			}
			return nil, fmt.Errorf("agent: no certificate for %s yet: %w", h.e.id, ctx.Err())
		}
	}
}

// SetTokens replaces this holder's token source.
func (h *Handle) SetTokens(tokens TokenSource) {
	e := h.e
	e.mu.Lock()
	h.tokens = tokens
	failing := e.lastErr != nil
	e.mu.Unlock()
	if failing {
		e.now() // a new token may be what was missing
	}
}

// Release gives the handle up; calling it more than once is harmless.
func (h *Handle) Release() { h.once.Do(func() { h.e.m.release(h) }) }

// entry is one identity's certificate and its renewal. It holds no
// goroutine between requests: timers call tick when a request is due and
// drop when the certificate expires, so a node with a thousand identities
// does not keep a thousand grown stacks.
type entry struct {
	m      *Manager
	id     spiffeid.ID
	ctx    context.Context // ends when the identity is released
	cancel context.CancelFunc

	mu      sync.Mutex
	refs    int       // guarded by m.mu
	holders []*Handle // oldest first
	svid    *SVID
	watch   watchers
	lastErr error
	attempt int         // failures in a row
	timer   *time.Timer // the next request
	expiry  *time.Timer // drops svid at its NotAfter
	running bool        // a request is in flight
	again   bool        // asked to request again once it ends
	halted  bool
}

func (e *entry) current() (*SVID, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.svid, e.watch.changed
}

func (e *entry) lastError() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.lastErr
}

// now requests a certificate at once (after one in flight, if any).
func (e *entry) now() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.halted {
		return
	}
	if e.running {
		e.again = true
		return
	}
	e.timer.Reset(0)
}

// halt stops the timers and cancels a request in flight.
func (e *entry) halt() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.halted = true
	e.timer.Stop()
	if e.expiry != nil {
		e.expiry.Stop()
	}
	e.cancel()
}

// notify wakes every holder; e.mu is held.
func (e *entry) notify() { e.watch.fire() }

// tick makes one request and schedules the next: at the rotation time after
// a success, after a jittered backoff after a failure. The current
// certificate is served until it expires, then dropped.
func (e *entry) tick() {
	e.mu.Lock()
	if e.halted || e.running {
		e.mu.Unlock()
		return
	}
	e.running = true
	e.m.wg.Add(1) // halted is false, so Close has not begun waiting
	e.mu.Unlock()
	defer e.m.wg.Done()

	cfg := &e.m.cfg
	clock := e.m.clock
	start := time.Now()
	svid, err := e.fetch(e.ctx)
	took := time.Since(start)

	e.mu.Lock()
	defer e.mu.Unlock()
	e.running = false
	if e.halted {
		return
	}
	var next time.Time
	if err == nil {
		e.attempt = 0
		e.lastErr = nil
		e.svid = svid
		e.notify()
		clock.learn(signedAfter(svid.NotBefore, svid.NotAfter, cfg.TTL), cfg.Now())
		// Count the lifetime from when it arrived: the CA backdates
		// NotBefore for clock skew, which must not pull renewal earlier.
		sent := clock.Now().Add(-took)
		from := svid.NotBefore
		if sent.After(from) {
			from = sent
		}
		next = cfg.Rotation.RenewAt(from, svid.NotAfter, cfg.Rand())
		if earliest := sent.Add(cfg.Backoff.Initial); next.Before(earliest) {
			next = earliest // a CA answering with nearly expired certificates must not make us spin
		}
		if e.expiry != nil {
			e.expiry.Stop()
		}
		e.expiry = time.AfterFunc(clock.Until(svid.NotAfter), func() { e.drop(svid) })
		cfg.Log.Info("certificate received", "spiffe_id", e.id.String(), "serial", fmt.Sprintf("%x", svid.Serial),
			"not_after", svid.NotAfter.UTC(), "renew_at", next.UTC(), "took", took)
		if cfg.Observer != nil {
			cfg.Observer.Issued(e.id, svid, took)
		}
	} else {
		delay := cfg.Backoff.Delay(e.attempt, cfg.Rand())
		if e.svid != nil {
			// Backoff alone may wait past the held certificate's expiry
			// though the CA is back well before it: never wait more than a
			// quarter of what is left, so the retries close in on it.
			if left := clock.Until(e.svid.NotAfter); left > 0 {
				delay = min(delay, max(cfg.Backoff.Initial/2, left/4))
			}
		}
		e.attempt++
		next = clock.Now().Add(delay)
		e.lastErr = err
		cfg.Log.Warn("certificate request failed; retrying", "spiffe_id", e.id.String(), "error", err, "attempt", e.attempt, "retry_in", delay)
		if cfg.Observer != nil {
			cfg.Observer.Failed(e.id, err, took)
		}
	}
	if e.again {
		e.again = false
		next = clock.Now()
	}
	e.timer.Reset(max(clock.Until(next), 0))
}

// drop stops serving svid once it has expired, unless it was replaced.
func (e *entry) drop(svid *SVID) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.halted || e.svid != svid {
		return
	}
	e.m.cfg.Log.Error("certificate expired before it could be renewed; serving none", "spiffe_id", e.id.String(), "not_after", svid.NotAfter.UTC())
	e.svid = nil
	e.notify()
}

// fetch makes a key and a CSR and asks the CA with the newest live
// holder's token; when the CA refuses a token (Unauthenticated: the pod it
// was bound to is gone, say), with the next holder's, so one departed pod
// cannot starve the renewals of the others that share its identity.
func (e *entry) fetch(ctx context.Context) (*SVID, error) {
	cfg := &e.m.cfg
	tokens := e.liveTokens(cfg.Now())
	if len(tokens) == 0 {
		return nil, errors.New("agent: no live holder has a token")
	}
	key, err := NewKey(cfg.KeyType)
	if err != nil {
		return nil, err
	}
	csrPEM, err := NewCSR(key, e.id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.RequestTimeout)
	defer cancel()
	var lastErr error
	for _, src := range tokens {
		token, err := src.Token()
		if err != nil {
			lastErr = err
			continue
		}
		chain, err := cfg.Signer.Sign(ctx, csrPEM, token, cfg.TTL)
		if status.Code(err) == codes.Unauthenticated {
			lastErr = fmt.Errorf("agent: CA refused or failed: %w", err)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("agent: CA refused or failed: %w", err)
		}
		return e.m.shared.svid(e.id, key, chain)
	}
	return nil, lastErr
}

// liveTokens are the token sources of the holders whose right to the
// identity has not ended, newest first.
func (e *entry) liveTokens(now time.Time) []TokenSource {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []TokenSource
	for i := len(e.holders) - 1; i >= 0; i-- {
		h := e.holders[i]
		if h.until.IsZero() || now.Before(h.until) {
			out = append(out, h.tokens)
		}
	}
	return out
}

// svid checks the CA's answer and makes it an SVID sharing the CA's
// certificates with every other.
func (s *sharedCerts) svid(id spiffeid.ID, key crypto.Signer, chain []*x509.Certificate) (*SVID, error) {
	chain, err := oneRoot(chain)
	if err != nil {
		return nil, err
	}
	if err := checkChain(id, key, chain); err != nil {
		return nil, err
	}
	return newSVID(id, chain[0], s.tail(chain[1:len(chain)-1]), key, s.root(chain[len(chain)-1]))
}

// oneRoot returns chain ending in the one root that issued the certificate
// before the roots. A Signer that flattens a CreateCertificate answer made
// during a root rotation ends the chain with every trusted root: they are
// the self-signed certificates after the leaf. Verifying against the wrong
// one would refuse a good certificate, and serving it as the SVID's root
// would mislead.
func oneRoot(chain []*x509.Certificate) ([]*x509.Certificate, error) {
	if len(chain) < 2 {
		return nil, errors.New("agent: CA returned fewer than 2 certificates")
	}
	first := len(chain) - 1 // chain[first:] are the roots; the last always counts as one
	for first > 1 && selfSigned(chain[first-1]) {
		first--
	}
	if first == len(chain)-1 {
		return chain, nil // one root: checkChain verifies it
	}
	root, err := issuerAmong(chain[first-1], chain[first:])
	if err != nil {
		return nil, err
	}
	return append(slices.Clip(chain[:first]), root), nil
}

func selfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

// checkChain makes sure the CA answered with a certificate for id and key,
// chained to the root it sent, before anyone is served it.
func checkChain(id spiffeid.ID, key crypto.Signer, chain []*x509.Certificate) error {
	if len(chain) < 2 {
		return errors.New("agent: CA returned fewer than 2 certificates")
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		return fmt.Errorf("agent: CA returned a certificate for %v, want %s", leaf.URIs, id)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return errors.New("agent: CA returned a certificate for another key")
	}
	root := chain[len(chain)-1]
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range chain[1 : len(chain)-1] {
		inter.AddCert(c)
	}
	// At the middle of its life, not by this node's clock: a node whose
	// clock is behind the CA's by more than its backdating would find every
	// certificate not yet valid and refuse them all (the suite of e2e/faults
	// found this). Validity is the CA's to give; the chain is checked here.
	mid := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: mid, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("agent: CA's chain does not verify: %w", err)
	}
	return nil
}

// sharedCerts keeps one copy of the CA certificates every answer repeats
// (intermediates, root), parsed and encoded, instead of one per identity:
// with a thousand identities on a node that is megabytes.
type sharedCerts struct {
	mu    sync.Mutex
	tails map[string]*chainTail        // by the DER of its certificates
	roots map[string]*x509.Certificate // by DER
}

// reset starts afresh once a CA rotation has left old entries behind.
func (s *sharedCerts) reset() {
	if s.tails == nil || len(s.tails)+len(s.roots) > 64 {
		s.tails, s.roots = map[string]*chainTail{}, map[string]*x509.Certificate{}
	}
}

func (s *sharedCerts) tail(certs []*x509.Certificate) *chainTail {
	var key []byte
	for _, c := range certs {
		key = append(key, c.Raw...)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reset()
	if t, ok := s.tails[string(key)]; ok {
		return t
	}
	t := &chainTail{certs: slices.Clone(certs)}
	for _, c := range certs {
		t.pem = append(t.pem, ca.EncodePEM(c)...)
	}
	s.tails[string(key)] = t
	return t
}

func (s *sharedCerts) root(c *x509.Certificate) *x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reset()
	if r, ok := s.roots[string(c.Raw)]; ok {
		return r
	}
	s.roots[string(c.Raw)] = c
	return c
}
