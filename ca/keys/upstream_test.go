package keys_test

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/keys"
)

// TestSetRoots: a root added restarts the propagation clock; one removed
// does not; the same roots again change nothing.
func TestSetRoots(t *testing.T) {
	root := func() *x509.Certificate {
		m, err := keys.Generate(keys.Options{TrustDomain: "cluster.local"})
		if err != nil {
			t.Fatal(err)
		}
		return m.RootCert
	}
	a, b := root(), root()
	t0 := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	u := &keys.UpstreamCA{Roots: []*x509.Certificate{a}, Since: t0}
	if u.SetRoots([]*x509.Certificate{a}, t0.Add(time.Hour)) || u.Since != t0 {
		t.Errorf("the same roots changed something (since %s)", u.Since)
	}
	if !u.SetRoots([]*x509.Certificate{a, b}, t0.Add(2*time.Hour)) || u.Since != t0.Add(2*time.Hour) || len(u.Roots) != 2 {
		t.Errorf("a root added: since %s, %d roots", u.Since, len(u.Roots))
	}
	if !u.SetRoots([]*x509.Certificate{b}, t0.Add(3*time.Hour)) || u.Since != t0.Add(2*time.Hour) || len(u.Roots) != 1 {
		t.Errorf("a root removed: since %s, %d roots", u.Since, len(u.Roots))
	}
}
