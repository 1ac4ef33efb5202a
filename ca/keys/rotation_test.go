package keys

import (
	"context"
	"crypto/x509"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// rotateThrough runs a whole rotation on m, handing each stage's material
// to at, and returns the final CA.
func rotateThrough(t *testing.T, m *Material, at func(Stage, *Material)) *Material {
	t.Helper()
	now := time.Now()
	steps := []struct {
		want Stage
		step func(*Material) (*Material, error)
	}{
		{StagePrepared, func(m *Material) (*Material, error) {
			return m.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, now)
		}},
		{StageDistributed, func(m *Material) (*Material, error) { return m.DistributeRoot(now) }},
		{StageSwitched, func(m *Material) (*Material, error) { return m.SwitchRoot(now) }},
		{StageNone, func(m *Material) (*Material, error) { return m.RetireRoot() }},
	}
	for _, s := range steps {
		next, err := s.step(m)
		if err != nil {
			t.Fatalf("to %s: %v", s.want, err)
		}
		if got := next.RotationStage(); got != s.want {
			t.Fatalf("stage %s, want %s", got, s.want)
		}
		if _, err := next.Issuer(now); err != nil {
			t.Fatalf("%s: issuer: %v", s.want, err)
		}
		at(s.want, next)
		m = next
	}
	return m
}

func TestRotationStagesRoundTripThroughFiles(t *testing.T) {
	old, err := Generate(Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	var newRoot *x509.Certificate
	final := rotateThrough(t, old, func(stage Stage, m *Material) {
		files, err := m.Files()
		if err != nil {
			t.Fatal(err)
		}
		back, err := ParseFiles(files)
		if err != nil {
			t.Fatalf("%s: ParseFiles: %v", stage, err)
		}
		if !back.Equal(m) || back.RotationStage() != stage {
			t.Fatalf("%s: files do not round-trip (stage read back %s)", stage, back.RotationStage())
		}
		roots := len(m.Roots)
		switch stage {
		case StagePrepared:
			newRoot = m.Rotation.NextRoot
			if roots != 1 || !m.CACert.Equal(old.CACert) {
				t.Errorf("prepared: %d roots, old intermediate signing %v; want 1, true", roots, m.CACert.Equal(old.CACert))
			}
		case StageDistributed:
			if roots != 2 || !m.Roots[1].Equal(newRoot) || !m.CACert.Equal(old.CACert) {
				t.Errorf("distributed: want old and new roots trusted and the old intermediate signing")
			}
		case StageSwitched:
			if roots != 2 || !m.RootCert.Equal(newRoot) || m.CACert.CheckSignatureFrom(newRoot) != nil {
				t.Errorf("switched: want the new root's intermediate signing, both roots trusted")
			}
			if got := m.OldRoots(); len(got) != 1 || !got[0].Equal(old.RootCert) {
				t.Errorf("switched: OldRoots = %d roots, want the old root", len(got))
			}
			if _, ok := files[NextRootKeyFile]; ok {
				t.Error("switched: next root key still stored")
			}
		case StageNone:
			if roots != 1 || !m.Roots[0].Equal(newRoot) || m.Rotation != nil {
				t.Errorf("retired: want only the new root trusted")
			}
			if _, ok := files[RotationFile]; ok {
				t.Error("retired: rotation state still stored")
			}
		}
	})
	if final.RootCert.Equal(old.RootCert) {
		t.Fatal("rotation kept the old root")
	}
}

func TestRotationStepsOutOfOrderRefused(t *testing.T) {
	m, err := Generate(Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for name, step := range map[string]func() (*Material, error){
		"distribute": func() (*Material, error) { return m.DistributeRoot(now) },
		"switch":     func() (*Material, error) { return m.SwitchRoot(now) },
		"retire":     m.RetireRoot,
		"abort":      m.AbortRotation,
	} {
		if _, err := step(); !errors.Is(err, ErrStage) {
			t.Errorf("%s with no rotation: err = %v, want ErrStage", name, err)
		}
	}
	p, _ := m.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, now)
	if _, err := p.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, now); !errors.Is(err, ErrStage) {
		t.Errorf("second prepare: err = %v, want ErrStage", err)
	}
	d, _ := p.DistributeRoot(now)
	aborted, err := d.AbortRotation()
	if err != nil {
		t.Fatal(err)
	}
	if aborted.Rotation != nil || len(aborted.Roots) != 1 || !aborted.Roots[0].Equal(m.RootCert) {
		t.Error("abort after distribute: want the old root alone and no rotation")
	}
	s, _ := d.SwitchRoot(now)
	if _, err := s.AbortRotation(); !errors.Is(err, ErrStage) {
		t.Errorf("abort after switch: err = %v, want ErrStage", err)
	}
	plugin := *m
	plugin.RootKey, plugin.RootCert = nil, nil
	if _, err := plugin.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, now); err == nil {
		t.Error("prepare without the root key: no error")
	}
}

func TestRotationFilesInconsistentRefused(t *testing.T) {
	m, err := Generate(Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	p, _ := m.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, now)
	d, _ := p.DistributeRoot(now)
	other, _ := Generate(Options{TrustDomain: "cluster.local"})
	prepared, _ := p.Files()
	distributed, _ := d.Files()
	otherFiles, _ := other.Files()
	for name, edit := range map[string]func(f map[string][]byte){
		"unknown stage":            func(f map[string][]byte) { f[RotationFile] = []byte(`{"stage":"halfway"}`) },
		"not JSON":                 func(f map[string][]byte) { f[RotationFile] = []byte(`stage: prepared`) },
		"next key missing":         func(f map[string][]byte) { delete(f, NextRootKeyFile) },
		"next key of another root": func(f map[string][]byte) { f[NextRootKeyFile] = otherFiles[RootKeyFile] },
		"next CA of another root": func(f map[string][]byte) {
			f[NextCACertFile], f[NextCAKeyFile] = otherFiles[CACertFile], otherFiles[CAKeyFile]
		},
		"distributed, root not in bundle": func(f map[string][]byte) {
			f[RotationFile] = distributed[RotationFile]
		},
		"next files without state": func(f map[string][]byte) { delete(f, RotationFile) },
		// The switch is gated on how long ago the root was distributed:
		// a state without that time, or with times out of order, would
		// let it come at once.
		"distributed without distributed_at": func(f map[string][]byte) {
			for k, v := range distributed {
				f[k] = v
			}
			f[RotationFile] = []byte(`{"stage":"distributed","started_at":"2026-01-01T00:00:00Z"}`)
		},
		"distributed before started": func(f map[string][]byte) {
			for k, v := range distributed {
				f[k] = v
			}
			f[RotationFile] = []byte(`{"stage":"distributed","started_at":"2026-01-02T00:00:00Z","distributed_at":"2026-01-01T00:00:00Z"}`)
		},
		"prepared without started_at": func(f map[string][]byte) { f[RotationFile] = []byte(`{"stage":"prepared"}`) },
	} {
		f := map[string][]byte{}
		for k, v := range prepared {
			f[k] = v
		}
		edit(f)
		if _, err := ParseFiles(f); err == nil {
			t.Errorf("%s: ParseFiles accepted it", name)
		}
	}
}

func TestStateDirSaveRefusesStale(t *testing.T) {
	dir, err := OpenStateDir(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	m, _, err := dir.LoadOrCreate(func() (*Material, error) { return Generate(Options{TrustDomain: "cluster.local"}) })
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p, _ := m.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, time.Now())
	if err := dir.Save(ctx, m, p); err != nil {
		t.Fatal(err)
	}
	// A renewal computed from the CA as it was before the rotation began
	// must not wipe the rotation out.
	renewed := *m
	if err := renewed.RenewIntermediate(ECDSAP256, time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := dir.Save(ctx, m, &renewed); !errors.Is(err, ErrStale) {
		t.Fatalf("Save over a changed store: err = %v, want ErrStale", err)
	}
	got, err := dir.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got.RotationStage() != StagePrepared || !got.Equal(p) {
		t.Fatalf("store holds stage %s, want the prepared rotation untouched", got.RotationStage())
	}
}

// FuzzParseRotation: whatever the rotation state and the next root hold
// (the Secret is writable by whoever may edit it), ParseFiles either
// refuses them or returns a CA that round-trips through its files.
func FuzzParseRotation(f *testing.F) {
	m, err := Generate(Options{TrustDomain: "cluster.local"})
	if err != nil {
		f.Fatal(err)
	}
	p, err := m.PrepareRotation(ECDSAP256, DefaultRootTTL, DefaultIntermediateTTL, time.Now())
	if err != nil {
		f.Fatal(err)
	}
	d, _ := p.DistributeRoot(time.Now())
	s, _ := d.SwitchRoot(time.Now())
	base, _ := p.Files()
	for _, x := range []*Material{p, d, s} {
		files, _ := x.Files()
		f.Add(files[RotationFile], files[NextRootCertFile])
	}
	f.Add([]byte(`{"stage":"switched","started_at":"2026-01-01T00:00:00Z"}`), []byte{})
	f.Fuzz(func(t *testing.T, state, nextRoot []byte) {
		files := map[string][]byte{}
		for k, v := range base {
			files[k] = v
		}
		files[RotationFile], files[NextRootCertFile] = state, nextRoot
		got, err := ParseFiles(files)
		if err != nil {
			return
		}
		again, err := got.Files()
		if err != nil {
			t.Fatalf("accepted CA does not encode: %v", err)
		}
		back, err := ParseFiles(again)
		if err != nil || !back.Equal(got) {
			t.Fatalf("accepted CA does not round-trip: %v", err)
		}
	})
}
