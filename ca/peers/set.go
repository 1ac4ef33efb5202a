package peers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Refresh bounds: a peer's refresh hint is followed within them, and a
// bundle without one is fetched every DefaultRefresh.
const (
	DefaultRefresh = 5 * time.Minute
	MinRefresh     = 30 * time.Second
	MaxRefresh     = time.Hour
)

// StaleAfter is how many refresh intervals without a good fetch make a
// peer's bundle stale (still served: a peer's endpoint being down is no
// reason to stop trusting it, but it is a reason to page someone).
const StaleAfter = 3

// Store keeps the last good bundle of each peer across restarts and
// replicas, and is where the agents read them; *ConfigMapStore is one.
type Store interface {
	Load(ctx context.Context) (map[spiffeid.TrustDomain][]byte, error)
	Save(ctx context.Context, td spiffeid.TrustDomain, bundle []byte) error
	// Prune drops every trust domain but keep's: a federation removed
	// from the configuration stops being trusted by the agents too.
	Prune(ctx context.Context, keep []spiffeid.TrustDomain) error
}

// Config wires a Set.
type Config struct {
	Peers []Peer
	Store Store // nil: nothing kept across restarts
	Log   *slog.Logger
	// MinRefresh overrides the floor of refresh intervals (tests).
	MinRefresh time.Duration
	Registerer prometheus.Registerer // nil: no metrics
}

// Status is what the Set knows of one peer.
type Status struct {
	TrustDomain spiffeid.TrustDomain
	Peer        Peer                 // as configured
	Bundle      *spiffebundle.Bundle // nil: none yet
	From        string               // "endpoint", "store" or "bootstrap"
	FetchedAt   time.Time            // of the last good fetch; zero if none since start
	LastError   error                // of the last fetch, nil if it was good
	Refresh     time.Duration        // the interval in effect
	Stale       bool
}

// Set holds the bundles of every peer and keeps them fresh.
type Set struct {
	cfg   Config
	mu    sync.Mutex
	state map[spiffeid.TrustDomain]*Status
	watch chan struct{} // closed and replaced at each change

	fetches *prometheus.CounterVec
}

// NewSet checks cfg.
func NewSet(cfg Config) (*Set, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = MinRefresh
	}
	s := &Set{cfg: cfg, state: map[spiffeid.TrustDomain]*Status{}, watch: make(chan struct{})}
	for _, p := range cfg.Peers {
		if _, dup := s.state[p.TrustDomain]; dup {
			return nil, fmt.Errorf("peers: %s listed twice", p.TrustDomain)
		}
		st := &Status{TrustDomain: p.TrustDomain, Peer: p, Refresh: DefaultRefresh}
		if p.Bootstrap != nil {
			st.Bundle, st.From = p.Bootstrap, "bootstrap"
		}
		s.state[p.TrustDomain] = st
	}
	s.fetches = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshid_ca_federated_bundle_fetches_total",
		Help: "Fetches of federated trust domains' bundles, by result: ok, unchanged, error, refused (older sequence number, or not a bundle of that trust domain).",
	}, []string{"trust_domain", "result"})
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(s.fetches); err != nil {
			return nil, err
		}
		if err := cfg.Registerer.Register(setCollector{s}); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Run loads the stored bundles, then fetches each peer's until ctx ends.
func (s *Set) Run(ctx context.Context) {
	if s.cfg.Store != nil {
		stored, err := s.cfg.Store.Load(ctx)
		if err != nil {
			s.cfg.Log.Warn("federated bundles: the stored ones could not be read; fetching afresh", "error", err)
		}
		for td, data := range stored {
			b, err := ParseBundle(td, data)
			if err != nil {
				s.cfg.Log.Warn("federated bundles: a stored bundle does not parse; ignored", "trust_domain", td.String(), "error", err)
				continue
			}
			if _, ok := s.state[td]; !ok {
				continue // no longer federated: pruned below
			}
			if err := s.accept(td, b, "store", time.Time{}); err != nil && !errors.Is(err, errUnchanged) {
				s.cfg.Log.Warn("federated bundles: a stored bundle not taken", "trust_domain", td.String(), "error", err)
			}
		}
		keep := make([]spiffeid.TrustDomain, 0, len(s.cfg.Peers))
		for _, p := range s.cfg.Peers {
			keep = append(keep, p.TrustDomain)
			// A peer known only by its bootstrap bundle is stored too:
			// the agents trust what the CA trusts, from the start.
			if _, ok := stored[p.TrustDomain]; !ok && p.Bootstrap != nil {
				s.save(ctx, p.TrustDomain, p.Bootstrap)
			}
		}
		if err := s.cfg.Store.Prune(ctx, keep); err != nil {
			s.cfg.Log.Warn("federated bundles: trust domains no longer federated not removed from the store", "error", err)
		}
	}
	var wg sync.WaitGroup
	for _, p := range s.cfg.Peers {
		wg.Add(1)
		go func() { defer wg.Done(); s.follow(ctx, p) }()
	}
	wg.Wait()
}

// follow fetches p's bundle at each refresh, backing off after failures.
func (s *Set) follow(ctx context.Context, p Peer) {
	backoff := 5 * time.Second
	for {
		trust := s.held(p.TrustDomain)
		b, err := Fetch(ctx, p, trust)
		if ctx.Err() != nil {
			return
		}
		wait := s.interval(p.TrustDomain)
		if err == nil {
			err = s.accept(p.TrustDomain, b, "endpoint", time.Now())
			switch {
			case err == nil:
				s.fetches.WithLabelValues(p.TrustDomain.String(), "ok").Inc()
				s.save(ctx, p.TrustDomain, b)
			case errors.Is(err, errUnchanged):
				s.fetches.WithLabelValues(p.TrustDomain.String(), "unchanged").Inc()
				err = nil
			default:
				s.fetches.WithLabelValues(p.TrustDomain.String(), "refused").Inc()
			}
			wait = s.interval(p.TrustDomain)
		} else {
			s.fetches.WithLabelValues(p.TrustDomain.String(), "error").Inc()
		}
		s.mu.Lock()
		s.state[p.TrustDomain].LastError = err
		s.mu.Unlock()
		if err != nil {
			s.cfg.Log.Warn("federated bundle not refreshed; the one held is kept", "trust_domain", p.TrustDomain.String(), "error", err, "retry_in", backoff)
			wait = min(backoff, wait)
			backoff = min(2*backoff, s.interval(p.TrustDomain))
		} else {
			backoff = 5 * time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

var errUnchanged = errors.New("peers: bundle unchanged")

// accept takes b as td's bundle, unless it is older than the one held.
func (s *Set) accept(td spiffeid.TrustDomain, b *spiffebundle.Bundle, from string, fetched time.Time) error {
	if b.TrustDomain() != td {
		return fmt.Errorf("peers: a bundle of %s offered for %s", b.TrustDomain(), td)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.state[td]
	if !ok {
		return fmt.Errorf("peers: %s is not a federated trust domain", td)
	}
	st.Refresh = s.refreshFor(b)
	if st.Bundle != nil && st.From != "bootstrap" {
		if st.Bundle.Equal(b) {
			if !fetched.IsZero() {
				st.FetchedAt, st.From = fetched, from
			}
			return errUnchanged
		}
		old, oldOK := st.Bundle.SequenceNumber()
		seq, newOK := b.SequenceNumber()
		switch {
		case oldOK && newOK && seq < old:
			return fmt.Errorf("peers: %s's bundle has sequence number %d, older than the %d held: refused (a replayed or rolled-back bundle)", td, seq, old)
		case oldOK && newOK && seq == old:
			return fmt.Errorf("peers: %s's bundle changed without a new sequence number (%d): refused", td, seq)
		}
	}
	st.Bundle, st.From = b, from
	if !fetched.IsZero() {
		st.FetchedAt = fetched
	}
	close(s.watch)
	s.watch = make(chan struct{})
	s.cfg.Log.Info("federated bundle updated", "trust_domain", td.String(), "from", from, "x509_authorities", len(b.X509Authorities()), "jwt_authorities", len(b.JWTAuthorities()))
	return nil
}

func (s *Set) refreshFor(b *spiffebundle.Bundle) time.Duration {
	hint, ok := b.RefreshHint()
	if !ok || hint <= 0 {
		return DefaultRefresh
	}
	return min(max(hint, s.cfg.MinRefresh), MaxRefresh)
}

func (s *Set) interval(td spiffeid.TrustDomain) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state[td].Refresh
}

func (s *Set) save(ctx context.Context, td spiffeid.TrustDomain, b *spiffebundle.Bundle) {
	if s.cfg.Store == nil {
		return
	}
	data, err := MarshalBundle(b)
	if err == nil {
		err = s.cfg.Store.Save(ctx, td, data)
	}
	if err != nil {
		s.cfg.Log.Warn("federated bundle not stored (a restart would fetch it again)", "trust_domain", td.String(), "error", err)
	}
}

// Bundles are the peers' bundles held now, by trust domain.
func (s *Set) Bundles() map[spiffeid.TrustDomain]*spiffebundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
	for td, st := range s.state {
		if st.Bundle != nil {
			out[td] = st.Bundle
		}
	}
	return out
}

// ForAgents is every peer's bundle held now as the agents read it: a JSON
// object from trust domain name to SPIFFE bundle, keys sorted; nil when
// none is held.
func (s *Set) ForAgents() []byte {
	out := map[string]json.RawMessage{}
	for td, b := range s.Bundles() {
		data, err := MarshalBundle(b)
		if err != nil {
			s.cfg.Log.Error("federated bundle not given to the agents: it does not marshal", "trust_domain", td.String(), "error", err)
			continue
		}
		out[td.String()] = data
	}
	if len(out) == 0 {
		return nil
	}
	data, err := json.Marshal(out)
	if err != nil {
		return nil
	}
	return data
}

// GetBundleForTrustDomain makes the Set a spiffebundle.Source of the peers'
// bundles (and only theirs).
func (s *Set) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if b := s.held(td); b != nil {
		return b, nil
	}
	return nil, fmt.Errorf("peers: no bundle for trust domain %q", td)
}

func (s *Set) held(td spiffeid.TrustDomain) *spiffebundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.state[td]; ok {
		return st.Bundle
	}
	return nil
}

// Changed is closed at the next change of any bundle.
func (s *Set) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.watch
}

// Status is every peer's, sorted by trust domain, as of now.
func (s *Set) Status(now time.Time) []Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Status, 0, len(s.state))
	for _, st := range s.state {
		c := *st
		c.Stale = stale(st, now)
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].TrustDomain.String() < out[j].TrustDomain.String() })
	return out
}

// stale: no good fetch for StaleAfter intervals (never fetched counts from
// nothing: a bundle only bootstrapped or stored is stale until fetched).
func stale(st *Status, now time.Time) bool {
	return st.FetchedAt.IsZero() || now.Sub(st.FetchedAt) > StaleAfter*st.Refresh
}

// setCollector exports each peer's bundle age and staleness at scrape time.
type setCollector struct{ s *Set }

var (
	ageDesc   = prometheus.NewDesc("meshid_ca_federated_bundle_age_seconds", "Seconds since a federated trust domain's bundle was last fetched good (absent: never since start).", []string{"trust_domain"}, nil)
	staleDesc = prometheus.NewDesc("meshid_ca_federated_bundle_stale", "1 when a federated trust domain's bundle has not been fetched good for 3 refresh intervals (it is still trusted).", []string{"trust_domain"}, nil)
)

func (c setCollector) Describe(ch chan<- *prometheus.Desc) { ch <- ageDesc; ch <- staleDesc }

func (c setCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, st := range c.s.Status(now) {
		if !st.FetchedAt.IsZero() {
			ch <- prometheus.MustNewConstMetric(ageDesc, prometheus.GaugeValue, now.Sub(st.FetchedAt).Seconds(), st.TrustDomain.String())
		}
		v := 0.0
		if st.Stale {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(staleDesc, prometheus.GaugeValue, v, st.TrustDomain.String())
	}
}

// MarshalBundle is b in the SPIFFE bundle format with its keys in a fixed
// order: go-spiffe's Marshal lists JWT authorities in map order, and a
// bundle that reads differently at each write would be rewritten in every
// namespace at every pass.
func MarshalBundle(b *spiffebundle.Bundle) ([]byte, error) {
	data, err := b.Marshal()
	if err != nil {
		return nil, fmt.Errorf("peers: %w", err)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("peers: %w", err)
	}
	var keys []json.RawMessage
	if err := json.Unmarshal(doc["keys"], &keys); err != nil {
		return nil, fmt.Errorf("peers: %w", err)
	}
	slices.SortFunc(keys, func(a, b json.RawMessage) int { return bytes.Compare(a, b) })
	if doc["keys"], err = json.Marshal(keys); err != nil {
		return nil, fmt.Errorf("peers: %w", err)
	}
	return json.Marshal(doc) // object keys sorted
}
