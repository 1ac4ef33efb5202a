package keys

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/meshid/meshid/ca"
)

// Stage is where a root rotation stands. A rotation goes
// StageNone → StagePrepared → StageDistributed → StageSwitched → StageNone,
// one stored step at a time, so a CA that stops anywhere resumes where it
// was.
type Stage string

const (
	// StageNone: no rotation under way.
	StageNone Stage = "none"
	// StagePrepared: a new root and an intermediate under it exist, trusted
	// by no one yet; the old root still signs.
	StagePrepared Stage = "prepared"
	// StageDistributed: the new root is in the trust bundle beside the old
	// one; the old root still signs.
	StageDistributed Stage = "distributed"
	// StageSwitched: the new intermediate signs; both roots are still
	// trusted while certificates from the old one are valid.
	StageSwitched Stage = "switched"
)

// Files of a rotation under way, beside the cacerts layout.
const (
	RotationFile     = "rotation.json"
	NextRootCertFile = "next-root-cert.pem"
	NextRootKeyFile  = "next-root-key.pem"
	NextCACertFile   = "next-ca-cert.pem"
	NextCAKeyFile    = "next-ca-key.pem"
)

// Rotation is a root rotation under way.
type Rotation struct {
	Stage         Stage
	StartedAt     time.Time
	DistributedAt time.Time // zero before StageDistributed
	SwitchedAt    time.Time // zero before StageSwitched

	// The CA that takes over at the switch; set while prepared or
	// distributed.
	NextRoot    *x509.Certificate
	NextRootKey crypto.Signer
	NextCACert  *x509.Certificate
	NextCAKey   crypto.Signer
}

// ErrStage says a rotation step was asked for in a stage that does not
// allow it.
var ErrStage = errors.New("keys: wrong root rotation stage")

// RotationStage is m's stage, StageNone when no rotation is under way.
func (m *Material) RotationStage() Stage {
	if m.Rotation == nil {
		return StageNone
	}
	return m.Rotation.Stage
}

func (m *Material) needStage(s Stage, step string) error {
	if got := m.RotationStage(); got != s {
		return fmt.Errorf("%w: %s needs stage %s, the CA is at %s", ErrStage, step, s, got)
	}
	return nil
}

// PrepareRotation makes a new root, and an intermediate under it, that will
// replace m's at the switch. Nothing trusts or uses them yet.
func (m *Material) PrepareRotation(alg Algorithm, rootTTL, caTTL time.Duration, now time.Time) (*Material, error) {
	if err := m.needStage(StageNone, "prepare"); err != nil {
		return nil, err
	}
	if m.RootKey == nil {
		return nil, errors.New("keys: rotating the root needs a CA whose root key meshid holds; replace a plug-in CA's files instead")
	}
	if m.KeyURI != "" {
		return nil, errors.New("keys: rotating the root of a CA whose key is in a KMS or HSM (--ca-key-uri) is not supported yet")
	}
	org := m.RootCert.Subject.Organization
	td := ""
	if len(org) > 0 {
		td = org[0]
	}
	fresh, err := Generate(Options{TrustDomain: td, Algorithm: alg, RootTTL: rootTTL, IntermediateTTL: caTTL, Now: now})
	if err != nil {
		return nil, err
	}
	next := *m
	next.Rotation = &Rotation{
		Stage:       StagePrepared,
		StartedAt:   now.UTC(),
		NextRoot:    fresh.RootCert,
		NextRootKey: fresh.RootKey,
		NextCACert:  fresh.CACert,
		NextCAKey:   fresh.CAKey,
	}
	return &next, nil
}

// DistributeRoot adds the prepared root to the trust bundle; the old root
// keeps signing.
func (m *Material) DistributeRoot(now time.Time) (*Material, error) {
	if err := m.needStage(StagePrepared, "distribute"); err != nil {
		return nil, err
	}
	next := *m
	r := *m.Rotation
	r.Stage, r.DistributedAt = StageDistributed, now.UTC()
	next.Rotation = &r
	next.Roots = append(slices.Clip(m.Roots), r.NextRoot)
	return &next, nil
}

// SwitchRoot makes the prepared intermediate sign. Both roots stay trusted.
func (m *Material) SwitchRoot(now time.Time) (*Material, error) {
	if err := m.needStage(StageDistributed, "switch"); err != nil {
		return nil, err
	}
	r := m.Rotation
	next := *m
	next.CACert, next.CAKey, next.Chain = r.NextCACert, r.NextCAKey, nil
	next.RootCert, next.RootKey = r.NextRoot, r.NextRootKey
	next.Rotation = &Rotation{Stage: StageSwitched, StartedAt: r.StartedAt, DistributedAt: r.DistributedAt, SwitchedAt: now.UTC()}
	return &next, nil
}

// RetireRoot ends the rotation: only the new root stays trusted.
func (m *Material) RetireRoot() (*Material, error) {
	if err := m.needStage(StageSwitched, "retire"); err != nil {
		return nil, err
	}
	next := *m
	next.Roots = []*x509.Certificate{m.RootCert}
	next.Rotation = nil
	return &next, nil
}

// AbortRotation drops a rotation that has not switched: the new root leaves
// the bundle and its keys are forgotten.
func (m *Material) AbortRotation() (*Material, error) {
	stage := m.RotationStage()
	if stage != StagePrepared && stage != StageDistributed {
		return nil, fmt.Errorf("%w: abort needs stage %s or %s, the CA is at %s (after the switch, finish with retire)", ErrStage, StagePrepared, StageDistributed, stage)
	}
	next := *m
	next.Roots = slices.DeleteFunc(slices.Clone(m.Roots), m.Rotation.NextRoot.Equal)
	next.Rotation = nil
	return &next, nil
}

// OldRoots are the roots a switched rotation will retire.
func (m *Material) OldRoots() []*x509.Certificate {
	if m.RotationStage() != StageSwitched {
		return nil
	}
	return slices.DeleteFunc(slices.Clone(m.Roots), m.RootCert.Equal)
}

type rotationJSON struct {
	Stage         Stage     `json:"stage"`
	StartedAt     time.Time `json:"started_at"`
	DistributedAt time.Time `json:"distributed_at,omitzero"`
	SwitchedAt    time.Time `json:"switched_at,omitzero"`
}

// addRotationFiles adds the rotation's files to files.
func (m *Material) addRotationFiles(files map[string][]byte) error {
	r := m.Rotation
	if r == nil {
		return nil
	}
	state, err := json.MarshalIndent(rotationJSON{Stage: r.Stage, StartedAt: r.StartedAt, DistributedAt: r.DistributedAt, SwitchedAt: r.SwitchedAt}, "", "  ")
	if err != nil {
		return fmt.Errorf("keys: %w", err)
	}
	files[RotationFile] = append(state, '\n')
	if r.NextRoot == nil {
		return nil
	}
	for name, key := range map[string]crypto.Signer{NextRootKeyFile: r.NextRootKey, NextCAKeyFile: r.NextCAKey} {
		if files[name], err = encodeKey(key); err != nil {
			return err
		}
	}
	files[NextRootCertFile] = ca.EncodePEM(r.NextRoot)
	files[NextCACertFile] = ca.EncodePEM(r.NextCACert)
	return nil
}

// parseRotation reads the rotation files, if any, into m and checks that
// they agree with the rest of the CA, so that a half-written or hand-edited
// state is refused rather than served.
func (m *Material) parseRotation(files map[string][]byte) error {
	if len(files[RotationFile]) == 0 {
		for _, name := range []string{NextRootCertFile, NextRootKeyFile, NextCACertFile, NextCAKeyFile} {
			if len(files[name]) > 0 {
				return fmt.Errorf("keys: %s present without %s", name, RotationFile)
			}
		}
		return nil
	}
	var state rotationJSON
	if err := json.Unmarshal(files[RotationFile], &state); err != nil {
		return fmt.Errorf("keys: %s: %w", RotationFile, err)
	}
	r := &Rotation{Stage: state.Stage, StartedAt: state.StartedAt, DistributedAt: state.DistributedAt, SwitchedAt: state.SwitchedAt}
	if err := r.checkTimes(); err != nil {
		return err
	}
	if m.RootKey == nil {
		return fmt.Errorf("keys: %s: a root rotation needs %s", RotationFile, RootKeyFile)
	}
	switch r.Stage {
	case StagePrepared, StageDistributed:
		if err := r.parseNext(files); err != nil {
			return err
		}
		trusted := containsCert(m.Roots, r.NextRoot)
		if r.Stage == StageDistributed && !trusted {
			return fmt.Errorf("keys: %s says %s but %s lacks %s", RotationFile, r.Stage, RootCertFile, NextRootCertFile)
		}
		if r.Stage == StagePrepared && trusted {
			return fmt.Errorf("keys: %s says %s but %s already holds %s", RotationFile, r.Stage, RootCertFile, NextRootCertFile)
		}
	case StageSwitched:
		if len(m.Roots) < 2 {
			return fmt.Errorf("keys: %s says %s but %s holds one root", RotationFile, r.Stage, RootCertFile)
		}
	default:
		return fmt.Errorf("keys: %s: unknown stage %q", RotationFile, r.Stage)
	}
	m.Rotation = r
	return nil
}

// checkTimes refuses a stage without the times that gate its next step:
// the switch waits on how long ago the root was distributed, so a missing
// or reordered time would let it come early.
func (r *Rotation) checkTimes() error {
	need := map[Stage][]struct {
		name string
		t    time.Time
	}{
		StagePrepared:    {{"started_at", r.StartedAt}},
		StageDistributed: {{"started_at", r.StartedAt}, {"distributed_at", r.DistributedAt}},
		StageSwitched:    {{"started_at", r.StartedAt}, {"distributed_at", r.DistributedAt}, {"switched_at", r.SwitchedAt}},
	}[r.Stage]
	for i, n := range need {
		if n.t.IsZero() {
			return fmt.Errorf("keys: %s says %s but has no %s", RotationFile, r.Stage, n.name)
		}
		if i > 0 && n.t.Before(need[i-1].t) {
			return fmt.Errorf("keys: %s: %s (%s) is before %s (%s)", RotationFile, n.name, n.t.Format(time.RFC3339), need[i-1].name, need[i-1].t.Format(time.RFC3339))
		}
	}
	return nil
}

func (r *Rotation) parseNext(files map[string][]byte) error {
	for _, name := range []string{NextRootCertFile, NextRootKeyFile, NextCACertFile, NextCAKeyFile} {
		if len(files[name]) == 0 {
			return fmt.Errorf("keys: %s says %s but %s: %w", RotationFile, r.Stage, name, errMissing)
		}
	}
	certs := map[string]**x509.Certificate{NextRootCertFile: &r.NextRoot, NextCACertFile: &r.NextCACert}
	for name, dst := range certs {
		c, err := parseOneCertificate(files[name])
		if err != nil {
			return fmt.Errorf("keys: %s: %w", name, err)
		}
		*dst = c
	}
	var err error
	if r.NextRootKey, err = parseKey(files[NextRootKeyFile]); err != nil {
		return fmt.Errorf("keys: %s: %w", NextRootKeyFile, err)
	}
	if r.NextCAKey, err = parseKey(files[NextCAKeyFile]); err != nil {
		return fmt.Errorf("keys: %s: %w", NextCAKeyFile, err)
	}
	if !publicKeyEqual(r.NextRootKey.Public(), r.NextRoot.PublicKey) {
		return fmt.Errorf("keys: %s does not match %s", NextRootKeyFile, NextRootCertFile)
	}
	if !publicKeyEqual(r.NextCAKey.Public(), r.NextCACert.PublicKey) {
		return fmt.Errorf("keys: %s does not match %s", NextCAKeyFile, NextCACertFile)
	}
	if !r.NextRoot.IsCA || r.NextRoot.CheckSignatureFrom(r.NextRoot) != nil {
		return fmt.Errorf("keys: %s is not a self-signed CA certificate", NextRootCertFile)
	}
	if !r.NextCACert.IsCA {
		return fmt.Errorf("keys: %s is not a CA certificate", NextCACertFile)
	}
	if err := r.NextCACert.CheckSignatureFrom(r.NextRoot); err != nil {
		return fmt.Errorf("keys: %s is not issued by %s: %w", NextCACertFile, NextRootCertFile, err)
	}
	return nil
}

func parseOneCertificate(data []byte) (*x509.Certificate, error) {
	certs, err := ca.ParseCertificatesPEM(data)
	if err != nil {
		return nil, err
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("holds %d certificates, want 1", len(certs))
	}
	return certs[0], nil
}
