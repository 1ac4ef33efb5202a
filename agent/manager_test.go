package agent

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/catest"
)

var web = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")

func newManager(t *testing.T, signer Signer) *Manager {
	t.Helper()
	m, err := NewManager(Config{
		Signer:  signer,
		TTL:     time.Hour,
		Backoff: Backoff{Initial: time.Second, Max: 2 * time.Minute},
		Rand:    func() float64 { return 0.5 }, // no jitter: exact times
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func TestManagerRotatesAtHalfLife(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m := newManager(t, c)
		h, first := holdWeb(t, m)
		if first.ID != web || first.Leaf().URIs[0].String() != web.String() {
			t.Fatalf("SVID for %s", first.Leaf().URIs)
		}
		start := time.Now()
		<-h.Changed()
		second := h.SVID()
		if took := time.Since(start); took != 30*time.Minute {
			t.Errorf("renewed after %s, want 30m (half of 1h)", took)
		}
		if second.Leaf().SerialNumber.Cmp(first.Leaf().SerialNumber) == 0 {
			t.Error("same serial after rotation")
		}
		if second.PrivateKey().Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(first.PrivateKey().Public()) {
			t.Error("rotation kept the old key")
		}
		if n := c.Calls(); n != 2 {
			t.Errorf("%d CA calls, want 2", n)
		}
	})
}

func TestManagerKeepsServingThroughOutage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m := newManager(t, c)
		h, first := holdWeb(t, m)
		c.SetDown(true)
		// Past the rotation point, the CA failing: the first certificate is
		// still served and requests keep coming, spaced by backoff.
		time.Sleep(50 * time.Minute)
		if h.SVID() != first {
			t.Fatal("certificate replaced or dropped while the CA was down")
		}
		calls := c.Calls()
		// 20 minutes of failures with backoff capped at 2 minutes: about
		// 1+1+2+4+...+64s then every 1-2 minutes.
		if calls < 10 || calls > 30 {
			t.Errorf("%d CA calls in 20 minutes of outage, want backoff between 1s and 2m", calls)
		}
		if got := status.Code(h.e.lastError()); got != codes.Unavailable {
			t.Errorf("last error %v, want the CA's Unavailable", h.e.lastError())
		}
		c.SetDown(false)
		select {
		case <-h.Changed():
		case <-time.After(2 * time.Minute):
			t.Fatal("not renewed within the 2m backoff cap after the CA came back")
		}
		if got := h.SVID(); got == first || got == nil {
			t.Fatal("no new certificate after recovery")
		}
	})
}

func TestManagerDropsExpiredCertificate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m := newManager(t, c)
		h, first := holdWeb(t, m)
		c.SetDown(true)
		time.Sleep(time.Until(first.Leaf().NotAfter) - time.Second)
		if h.SVID() != first {
			t.Fatal("dropped before expiry")
		}
		time.Sleep(2 * time.Second)
		if h.SVID() != nil {
			t.Fatal("an expired certificate is still served")
		}
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		if _, err := h.Wait(ctx); err == nil {
			t.Fatal("Wait returned with the CA down")
		}
	})
}

func TestManagerSharesAndForgetsIdentities(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m := newManager(t, c)
		a := m.Acquire(web, StaticToken(web.String()))
		b := m.Acquire(web, StaticToken(web.String()))
		sa, err := a.Wait(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		sb, _ := b.Wait(t.Context())
		if sa != sb || c.Calls() != 1 {
			t.Fatalf("two holders of one identity: %d CA calls, same SVID %v", c.Calls(), sa == sb)
		}
		a.Release()
		a.Release() // harmless twice
		if ids := m.Identities(); len(ids) != 1 {
			t.Fatalf("identities %v after one of two releases", ids)
		}
		b.Release()
		if ids := m.Identities(); len(ids) != 0 {
			t.Fatalf("identities %v after every holder released", ids)
		}
		// Its renewal loop has stopped: no more CA calls.
		time.Sleep(2 * time.Hour)
		if n := c.Calls(); n != 1 {
			t.Errorf("%d CA calls after the identity was forgotten", n)
		}
	})
}

func TestManagerRefusesWrongAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		// A token for another identity: the CA signs for that one, the
		// CSR does not match, and nothing is served.
		m := newManager(t, c)
		h := m.Acquire(web, StaticToken("spiffe://cluster.local/ns/shop/sa/other"))
		defer h.Release()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		if _, err := h.Wait(ctx); err == nil {
			t.Fatal("served a certificate the CA refused")
		}
		// A new token source while failing is tried at once.
		h.SetTokens(StaticToken(web.String()))
		ctx2, cancel2 := context.WithTimeout(t.Context(), 10*time.Millisecond)
		defer cancel2()
		if _, err := h.Wait(ctx2); err != nil {
			t.Fatalf("new token not used at once: %v", err)
		}
	})
}

func TestCheckSVID(t *testing.T) {
	c := catest.New(t)
	key, _ := NewKey(ECDSAP256)
	other, _ := NewKey(ECDSAP256)
	csrPEM, _ := NewCSR(key, web)
	chain, err := c.Sign(context.Background(), csrPEM, web.String(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	shared := new(sharedCerts)
	svid, err := shared.svid(web, key, chain)
	if err != nil {
		t.Fatalf("good chain refused: %v", err)
	}
	checkSVIDEncodings(t, svid, key, chain)
	key2, _ := NewKey(ECDSAP256)
	csr2, _ := NewCSR(key2, web)
	chain2, err := c.Sign(context.Background(), csr2, web.String(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	svid2, err := shared.svid(web, key2, chain2)
	if err != nil {
		t.Fatal(err)
	}
	if svid2.intermediates != svid.intermediates || svid2.Root != svid.Root {
		t.Error("two certificates from one CA do not share its certificates")
	}
	if _, err := new(sharedCerts).svid(web, other, chain); err == nil {
		t.Error("chain for another key accepted")
	}
	if _, err := new(sharedCerts).svid(spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/x"), key, chain); err == nil {
		t.Error("chain for another identity accepted")
	}
	if _, err := new(sharedCerts).svid(web, key, chain[:1]); err == nil {
		t.Error("chain without root accepted")
	}
	otherChain, err := catest.New(t).Sign(context.Background(), csrPEM, web.String(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	mixed := append(append([]*x509.Certificate{}, chain[:len(chain)-1]...), otherChain[len(otherChain)-1])
	if _, err := new(sharedCerts).svid(web, key, mixed); err == nil {
		t.Error("chain ending in another CA's root accepted")
	}
}

func TestNewManagerRefusesBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{},
		{Signer: catest.New(t), KeyType: "dsa"},
		{Signer: catest.New(t), TTL: -time.Second},
		{Signer: catest.New(t), Rotation: Rotation{Fraction: 2}},
		{Signer: catest.New(t), Backoff: Backoff{Initial: time.Minute, Max: time.Second}},
	} {
		if _, err := NewManager(cfg); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}

var discardLog = slog.New(slog.DiscardHandler)

// holdWeb holds web's identity until the test ends and waits for its first
// certificate.
func holdWeb(t *testing.T, m *Manager) (*Handle, *SVID) {
	t.Helper()
	h := m.Acquire(web, StaticToken(web.String()))
	t.Cleanup(h.Release)
	svid, err := h.Wait(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return h, svid
}

func TestManagerRenewNow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m := newManager(t, c)
		h, first := holdWeb(t, m)
		start := time.Now()
		changed := h.Changed()
		m.Renew(web)
		<-changed
		if took := time.Since(start); took != 0 {
			t.Errorf("renewed after %s of fake time, want at once", took)
		}
		if h.SVID() == first {
			t.Error("Renew served the same certificate")
		}
		m.Renew(spiffeid.RequireFromString("spiffe://cluster.local/ns/x/sa/unknown")) // not held: nothing happens
		if n := c.Calls(); n != 2 {
			t.Errorf("%d CA calls, want 2", n)
		}
	})
}

// checkSVIDEncodings: every form an SVID serves says the same as the chain
// and key it was made from.
func checkSVIDEncodings(t *testing.T, svid *SVID, key crypto.Signer, chain []*x509.Certificate) {
	t.Helper()
	leaf := chain[0]
	if svid.Serial.Cmp(leaf.SerialNumber) != 0 || !svid.NotBefore.Equal(leaf.NotBefore) || !svid.NotAfter.Equal(leaf.NotAfter) {
		t.Errorf("SVID fields %x %v %v, leaf %x %v %v", svid.Serial, svid.NotBefore, svid.NotAfter, leaf.SerialNumber, leaf.NotBefore, leaf.NotAfter)
	}
	fromPEM, err := ca.ParseCertificatesPEM(svid.ChainPEM())
	if err != nil {
		t.Fatal(err)
	}
	fromDER, err := x509.ParseCertificates(svid.ChainDER())
	if err != nil {
		t.Fatal(err)
	}
	want := chain[:len(chain)-1]
	for name, got := range map[string][]*x509.Certificate{"ChainPEM": fromPEM, "ChainDER": fromDER, "Certificates": svid.Certificates()} {
		if !slices.EqualFunc(got, want, (*x509.Certificate).Equal) {
			t.Errorf("%s holds %d certificates, not the leaf and intermediates (%d)", name, len(got), len(want))
		}
	}
	if !svid.Root.Equal(chain[len(chain)-1]) {
		t.Error("Root is not the chain's root")
	}
	pub := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !pub.Equal(svid.PrivateKey().Public()) {
		t.Error("PrivateKey is not the key")
	}
	if _, err := tls.X509KeyPair(svid.ChainPEM(), svid.KeyPEM()); err != nil {
		t.Errorf("ChainPEM and KeyPEM do not make a key pair: %v", err)
	}
}

// Pods A and B share an identity on one node (node mode). B connects last,
// then B's pod is deleted: its pod-bound token is refused from then on.
// Renewals must go on with a token of a live holder, A's, whether B's
// stream is still open or gone; and a holder that comes and goes (a unary
// FetchSecrets) must not leave its token behind.
func TestManagerRenewsWithALiveHoldersToken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		var mu sync.Mutex
		dead := map[string]bool{}
		var used []string
		c.Identify = func(tok string) (spiffeid.ID, error) {
			mu.Lock()
			defer mu.Unlock()
			used = append(used, tok)
			if dead[tok] {
				return spiffeid.ID{}, errors.New("the token's pod is gone")
			}
			return web, nil
		}
		m := newManager(t, c)
		renewed := func(h *Handle) {
			t.Helper()
			changed := h.Changed()
			m.Renew(web)
			select {
			case <-changed:
			case <-time.After(time.Minute):
				t.Fatalf("no renewal within a minute; tokens tried: %v", used)
			}
		}
		a := m.Acquire(web, StaticToken("token-a"))
		defer a.Release()
		if _, err := a.Wait(t.Context()); err != nil {
			t.Fatal(err)
		}
		b := m.Acquire(web, StaticToken("token-b"))
		mu.Lock()
		dead["token-b"] = true
		mu.Unlock()
		renewed(a) // B's stream still open: its token first, then A's
		b.Release()
		renewed(a) // B gone: A's token only

		f := m.Acquire(web, StaticToken("token-fetch")) // a unary fetch comes and goes
		f.Release()
		mu.Lock()
		dead["token-fetch"] = true
		mu.Unlock()
		renewed(a)

		want := []string{"token-a", "token-b", "token-a", "token-a", "token-a"}
		if !slices.Equal(used, want) {
			t.Errorf("tokens sent to the CA: %v, want %v", used, want)
		}
	})
}

// TestManagerRetriesBeforeExpiry: an outage that ends shortly before the
// certificate lapses must not leave the next retry, spaced by exponential
// backoff, past its expiry. The CA is down from just before the renewal
// point until 6 s before the end of a 1-minute certificate; backoff alone
// would wait 24 s more.
func TestManagerRetriesBeforeExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := catest.New(t)
		m, err := NewManager(Config{
			Signer:  c,
			TTL:     time.Minute,
			Backoff: Backoff{Initial: time.Second, Max: 2 * time.Minute},
			Rand:    func() float64 { return 0.5 },
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(m.Close)
		h, first := holdWeb(t, m)
		time.Sleep(29 * time.Second)
		c.SetDown(true)
		time.Sleep(time.Until(first.Leaf().NotAfter) - 6*time.Second)
		c.SetDown(false)
		select {
		case <-h.Changed():
		case <-time.After(time.Until(first.Leaf().NotAfter)):
			t.Fatal("the certificate lapsed though the CA was back 6 s before its expiry")
		}
		if got := h.SVID(); got == nil || got == first {
			t.Fatalf("after the outage: %v, want a new certificate", got)
		}
	})
}

// A node clock minutes off the CA's: certificates are taken, renewed at half
// their life and dropped at their end, all in the CA's time.
func TestManagerFollowsTheCAsClock(t *testing.T) {
	for _, tc := range []struct {
		name      string
		skew      time.Duration // node clock minus CA clock
		renewedIn time.Duration // after the first certificate
		behind    time.Duration // learnt
	}{
		// Behind by more than the CA backdates NotBefore (1 minute): every
		// certificate looks not yet valid by the node's clock.
		{name: "behind", skew: -3 * time.Minute, renewedIn: 30 * time.Minute, behind: 3 * time.Minute},
		// Ahead: what is left looks 3 minutes shorter; renewed early.
		{name: "ahead", skew: 3 * time.Minute, renewedIn: 28*time.Minute + 30*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				c := catest.New(t)
				obs := &clockObserver{}
				m, err := NewManager(Config{
					Signer:   c,
					TTL:      time.Hour,
					Rand:     func() float64 { return 0.5 },
					Now:      func() time.Time { return time.Now().Add(tc.skew) },
					Observer: obs,
				})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(m.Close)
				h, _ := holdWeb(t, m)
				if got := obs.last(); got != tc.behind {
					t.Errorf("clock behind the CA's by %s, want %s", got, tc.behind)
				}
				start := time.Now()
				<-h.Changed()
				if took := time.Since(start); took != tc.renewedIn {
					t.Errorf("renewed after %s, want %s", took, tc.renewedIn)
				}
				// The CA gone: the certificate is served to its end by the
				// CA's clock (a node behind would serve it 3 minutes past).
				c.SetDown(true)
				second := h.SVID()
				time.Sleep(time.Until(second.Leaf().NotAfter))
				synctest.Wait()
				if tc.skew < 0 && h.SVID() != nil {
					t.Error("a certificate expired by the CA's clock is still served")
				}
			})
		})
	}
}

type clockObserver struct {
	mu     sync.Mutex
	behind time.Duration
}

func (o *clockObserver) Issued(spiffeid.ID, *SVID, time.Duration) {}
func (o *clockObserver) Failed(spiffeid.ID, error, time.Duration) {}
func (o *clockObserver) ClockBehind(d time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.behind = d
}

func (o *clockObserver) last() time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.behind
}

// A chain signed by a CA whose clock is ahead of this node's (here: signed
// now, checked in a synctest bubble, whose clock reads 2000) is not refused
// for looking not yet valid: validity is judged by the CA's clock.
func TestCheckSVIDIgnoresThisNodesClock(t *testing.T) {
	c := catest.New(t)
	key, _ := NewKey(ECDSAP256)
	csrPEM, _ := NewCSR(key, web)
	chain, err := c.Sign(context.Background(), csrPEM, web.String(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	synctest.Test(t, func(t *testing.T) {
		if !time.Now().Before(chain[0].NotBefore) {
			t.Fatal("the bubble's clock is not behind the CA's")
		}
		if _, err := new(sharedCerts).svid(web, key, chain); err != nil {
			t.Errorf("a good chain refused by a node whose clock is behind: %v", err)
		}
	})
}
