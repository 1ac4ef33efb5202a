package rotation

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

// Step names the move from one stage to the next.
type Step string

const (
	StepPrepare    Step = "prepare"    // StageNone → StagePrepared
	StepDistribute Step = "distribute" // StagePrepared → StageDistributed
	StepSwitch     Step = "switch"     // StageDistributed → StageSwitched
	StepRetire     Step = "retire"     // StageSwitched → StageNone
)

// NextStep is the step taken from stage s.
func NextStep(s keys.Stage) Step {
	switch s {
	case keys.StagePrepared:
		return StepDistribute
	case keys.StageDistributed:
		return StepSwitch
	case keys.StageSwitched:
		return StepRetire
	}
	return StepPrepare
}

// Ledger tells which issued certificates are still valid; *ledger.Ledger
// is one.
type Ledger interface {
	Outstanding(ctx context.Context, cutoff, now time.Time) (n int, lastExpiry time.Time, err error)
}

// Bundles tells where the trust bundle has not yet reached;
// *distribute.ConfigMaps is one.
type Bundles interface {
	Lagging(ctx context.Context, roots []*x509.Certificate) ([]string, error)
}

// Config wires a Rotator.
type Config struct {
	Store           keys.Store
	Source          *keys.Source // set to each stage's issuer as it is taken
	Algorithm       keys.Algorithm
	RootTTL         time.Duration
	IntermediateTTL time.Duration
	Ledger          Ledger
	// Bundles is nil when meshid-ca does not write bundle ConfigMaps.
	Bundles Bundles
	// Sync is how long every replica may take to read a stage from the
	// store (their --ca-sync-interval).
	Sync time.Duration
	// Propagation is how long a bundle ConfigMap may take to reach the
	// files agents read: the kubelet refreshes mounted ConfigMaps about
	// once a minute, with a cache of up to a minute more.
	Propagation time.Duration
	Now         func() time.Time // nil: time.Now
	Log         *slog.Logger
}

// Rotator takes the stages of a root rotation, one at a time, each only
// once its checks pass.
type Rotator struct {
	cfg Config
	mu  sync.Mutex // one step at a time in this process; the store orders replicas
}

// New checks cfg.
func New(cfg Config) (*Rotator, error) {
	if cfg.Store == nil || cfg.Source == nil || cfg.Ledger == nil {
		return nil, errors.New("rotation: config needs a store, a source and a ledger")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Rotator{cfg: cfg}, nil
}

// Check is one condition of the next step.
type Check struct {
	Name   string
	Passed bool
	Detail string    // what was found, or what is awaited
	At     time.Time // when it is expected to pass, if known
}

// Status is where a rotation stands and what its next step waits for.
type Status struct {
	Stage         keys.Stage
	Next          Step
	Checks        []Check // of Next
	Roots         []*x509.Certificate
	SigningRoot   *x509.Certificate
	NextRoot      *x509.Certificate   // prepared or distributed
	OldRoots      []*x509.Certificate // switched
	StartedAt     time.Time
	DistributedAt time.Time
	SwitchedAt    time.Time
}

// Ready reports whether every check of the next step passed.
func (s *Status) Ready() bool {
	for _, c := range s.Checks {
		if !c.Passed {
			return false
		}
	}
	return true
}

// ErrStageChanged says the rotation is not at the stage the caller
// expected (someone else moved it): read the status again.
var ErrStageChanged = errors.New("rotation: the rotation is not at the expected stage")

// ChecksError says a step was refused because checks failed.
type ChecksError struct {
	Step   Step
	Failed []Check
}

func (e *ChecksError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "rotation: %s refused:", e.Step)
	for _, c := range e.Failed {
		fmt.Fprintf(&b, " %s: %s;", c.Name, c.Detail)
	}
	return strings.TrimSuffix(b.String(), ";")
}

// Status reads the stored CA and evaluates the next step's checks.
func (r *Rotator) Status(ctx context.Context) (*Status, error) {
	m, err := r.cfg.Store.Load(ctx)
	if err != nil {
		return nil, err
	}
	return r.status(ctx, m)
}

func (r *Rotator) status(ctx context.Context, m *keys.Material) (*Status, error) {
	st := &Status{Stage: m.RotationStage(), Roots: m.Roots, SigningRoot: m.RootCert}
	st.Next = NextStep(st.Stage)
	if rot := m.Rotation; rot != nil {
		st.NextRoot, st.StartedAt, st.DistributedAt, st.SwitchedAt = rot.NextRoot, rot.StartedAt, rot.DistributedAt, rot.SwitchedAt
	}
	st.OldRoots = m.OldRoots()
	checks, err := r.checks(ctx, m, st)
	if err != nil {
		return nil, err
	}
	st.Checks = checks
	return st, nil
}

// checks evaluates the conditions of the step after m's stage.
func (r *Rotator) checks(ctx context.Context, m *keys.Material, st *Status) ([]Check, error) {
	now := r.cfg.Now()
	switch st.Next {
	case StepPrepare:
		c := Check{Name: "root-key", Passed: m.RootKey != nil, Detail: "meshid holds the root key"}
		if !c.Passed {
			c.Detail = "meshid does not hold the root key (a plug-in CA): rotate by replacing its files in stages"
		}
		return []Check{c}, nil
	case StepDistribute:
		return []Check{{Name: "next-ca", Passed: true, Detail: "the new root and its intermediate are stored and match"}}, nil
	case StepSwitch:
		// Certificates issued after every replica serves the new bundle
		// carry it (Istio's agents take their ROOTCA from the answer).
		cutoff := st.DistributedAt.Add(r.cfg.Sync)
		checks := []Check{r.replicas(st.DistributedAt, now)}
		if r.cfg.Bundles != nil {
			checks = append(checks, r.configMaps(ctx, m.Roots))
		}
		checks = append(checks, r.propagation(st.DistributedAt, now))
		w, err := r.workloads(ctx, cutoff, now, "certificates issued before the new root joined the bundle")
		if err != nil {
			return nil, err
		}
		return append(checks, w), nil
	case StepRetire:
		cutoff := st.SwitchedAt.Add(r.cfg.Sync)
		checks := []Check{r.replicas(st.SwitchedAt, now)}
		w, err := r.workloads(ctx, cutoff, now, "certificates that chain to the old root")
		if err != nil {
			return nil, err
		}
		return append(checks, w), nil
	}
	return nil, fmt.Errorf("rotation: no step after stage %s", st.Stage)
}

// waited passes once now reaches at: detail says why it waits, or, once
// passed, what the wait was for.
func waited(name string, at, now time.Time, passed, waiting string) Check {
	if !now.Before(at) {
		return Check{Name: name, Passed: true, Detail: passed, At: at}
	}
	return Check{Name: name, Detail: waiting + "; waiting until " + at.UTC().Format(time.RFC3339), At: at}
}

func (r *Rotator) replicas(since, now time.Time) Check {
	return waited("replicas", since.Add(r.cfg.Sync), now,
		fmt.Sprintf("every replica has read the stage (they read the store every %s)", r.cfg.Sync),
		fmt.Sprintf("replicas read the store every %s", r.cfg.Sync))
}

func (r *Rotator) configMaps(ctx context.Context, roots []*x509.Certificate) Check {
	lagging, err := r.cfg.Bundles.Lagging(ctx, roots)
	switch {
	case err != nil:
		return Check{Name: "configmaps", Detail: "cannot read the bundle ConfigMaps: " + err.Error()}
	case len(lagging) > 0:
		shown := lagging[:min(len(lagging), 5)]
		more := ""
		if len(lagging) > len(shown) {
			more = fmt.Sprintf(" and %d more", len(lagging)-len(shown))
		}
		return Check{Name: "configmaps", Detail: fmt.Sprintf("%d namespaces lack the new bundle: %s%s", len(lagging), strings.Join(shown, ", "), more)}
	}
	return Check{Name: "configmaps", Passed: true, Detail: "every namespace's bundle ConfigMap holds both roots"}
}

func (r *Rotator) propagation(since, now time.Time) Check {
	return waited("propagation", since.Add(r.cfg.Propagation), now,
		fmt.Sprintf("%s since distribution, for kubelets to refresh mounted bundles and agents to re-read them", r.cfg.Propagation),
		fmt.Sprintf("kubelets and agents may take %s to see the bundle", r.cfg.Propagation))
}

func (r *Rotator) workloads(ctx context.Context, cutoff, now time.Time, what string) (Check, error) {
	n, last, err := r.cfg.Ledger.Outstanding(ctx, cutoff, now)
	if err != nil {
		return Check{}, fmt.Errorf("rotation: reading the ledger: %w", err)
	}
	if now.Before(cutoff) {
		// Replicas may still issue from the previous stage.
		return Check{Name: "workloads", Detail: "waiting for every replica to read the stage", At: cutoff}, nil
	}
	if n > 0 {
		return Check{Name: "workloads", At: last,
			Detail: fmt.Sprintf("%s: %d still valid; the last lapses at %s", what, n, last.UTC().Format(time.RFC3339))}, nil
	}
	return Check{Name: "workloads", Passed: true, Detail: "no valid " + what}, nil
}

// Advance takes the step after stage from, if the rotation is still there
// and every check passes (force takes it regardless, and logs what it
// overrode). actor is who asked, for the log.
func (r *Rotator) Advance(ctx context.Context, from keys.Stage, force bool, actor string) (*Status, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m, err := r.cfg.Store.Load(ctx)
	if err != nil {
		return nil, err
	}
	if m.RotationStage() != from {
		return nil, fmt.Errorf("%w: it is at %s, not %s", ErrStageChanged, m.RotationStage(), from)
	}
	st, err := r.status(ctx, m)
	if err != nil {
		return nil, err
	}
	var failed []Check
	for _, c := range st.Checks {
		if !c.Passed {
			failed = append(failed, c)
		}
	}
	if st.Next == StepPrepare && m.RootKey == nil {
		return nil, &ChecksError{Step: st.Next, Failed: failed} // not forceable
	}
	if len(failed) > 0 && !force {
		return nil, &ChecksError{Step: st.Next, Failed: failed}
	}
	for _, c := range failed {
		r.cfg.Log.Warn("root rotation: check overridden by force", "step", st.Next, "check", c.Name, "detail", c.Detail, "actor", actor)
	}
	now := r.cfg.Now()
	var next *keys.Material
	switch st.Next {
	case StepPrepare:
		next, err = m.PrepareRotation(r.cfg.Algorithm, r.cfg.RootTTL, r.cfg.IntermediateTTL, now)
	case StepDistribute:
		next, err = m.DistributeRoot(now)
	case StepSwitch:
		next, err = m.SwitchRoot(now)
	case StepRetire:
		next, err = m.RetireRoot()
	}
	if err != nil {
		return nil, err
	}
	if err := r.commit(ctx, m, next); err != nil {
		return nil, err
	}
	r.cfg.Log.Info("root rotation: step taken", "step", st.Next, "stage", next.RotationStage(), "actor", actor, "forced", len(failed) > 0,
		"signing_root", ca.Fingerprint(next.RootCert), "roots", len(next.Roots))
	return r.status(ctx, next)
}

// Abort drops a rotation that has not switched yet.
func (r *Rotator) Abort(ctx context.Context, from keys.Stage, actor string) (*Status, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m, err := r.cfg.Store.Load(ctx)
	if err != nil {
		return nil, err
	}
	if m.RotationStage() != from {
		return nil, fmt.Errorf("%w: it is at %s, not %s", ErrStageChanged, m.RotationStage(), from)
	}
	next, err := m.AbortRotation()
	if err != nil {
		return nil, err
	}
	if err := r.commit(ctx, m, next); err != nil {
		return nil, err
	}
	r.cfg.Log.Info("root rotation: aborted", "stage", from, "actor", actor)
	return r.status(ctx, next)
}

// commit stores next in place of m and signs with it. The issuer is
// checked before anything is stored, so a stage that could not sign is
// never written.
func (r *Rotator) commit(ctx context.Context, m, next *keys.Material) error {
	is, err := next.Issuer(r.cfg.Now())
	if err != nil {
		return fmt.Errorf("rotation: the CA of the next stage does not load: %w", err)
	}
	if err := r.cfg.Store.Save(ctx, m, next); err != nil {
		if errors.Is(err, keys.ErrStale) {
			return fmt.Errorf("%w: the stored CA changed meanwhile (an intermediate renewal or another replica's step)", ErrStageChanged)
		}
		return err
	}
	r.cfg.Source.Use(next, is)
	return nil
}
