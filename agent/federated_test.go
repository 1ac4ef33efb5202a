package agent

import (
	"crypto/x509"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca/keys"
)

func bundleJSON(t *testing.T, td spiffeid.TrustDomain, seq uint64) (json.RawMessage, *x509.Certificate) {
	t.Helper()
	m, err := keys.Generate(keys.Options{TrustDomain: td.String(), Algorithm: keys.ECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	b := spiffebundle.FromX509Authorities(td, []*x509.Certificate{m.RootCert})
	b.SetSequenceNumber(seq)
	data, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return data, m.RootCert
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path+".tmp", data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

func TestLoadFederated(t *testing.T) {
	own := spiffeid.RequireTrustDomainFromString("cluster.local")
	a := spiffeid.RequireTrustDomainFromString("a.example")
	bTD := spiffeid.RequireTrustDomainFromString("b.example")
	path := filepath.Join(t.TempDir(), FederatedBundlesKey)
	b := NewBundle(own, nil)
	log := slog.New(slog.DiscardHandler)

	// No file (meshid-ca federates with nobody): no federation.
	LoadFederated(b, path, log)
	if len(b.Federated()) != 0 {
		t.Fatal("federated bundles from a missing file")
	}

	aJSON, aRoot := bundleJSON(t, a, 1)
	bJSON, _ := bundleJSON(t, bTD, 1)
	ownJSON, _ := bundleJSON(t, own, 1)
	writeJSON(t, path, map[string]json.RawMessage{"a.example": aJSON, "b.example": bJSON, "cluster.local": ownJSON, "Not A Domain": aJSON})
	changed := b.Changed()
	LoadFederated(b, path, log)
	got := b.Federated()
	if len(got) != 2 || !got[a].HasX509Authority(aRoot) || got[bTD] == nil {
		t.Fatalf("federated %v, want a.example and b.example", got)
	}
	if _, ok := got[own]; ok {
		t.Fatal("an entry for the own trust domain was taken as a federated bundle")
	}
	select {
	case <-changed:
	default:
		t.Fatal("no change announced")
	}

	// b.example's entry turns to junk: its last good bundle is kept, and
	// nothing is announced since nothing trusted changed.
	writeJSON(t, path, map[string]json.RawMessage{"a.example": aJSON, "b.example": json.RawMessage(`{"keys":"junk"}`)})
	held := b.Federated()[bTD]
	changed = b.Changed()
	LoadFederated(b, path, log)
	if !b.Federated()[bTD].Equal(held) {
		t.Fatal("a junk entry dropped b.example's last good bundle")
	}
	select {
	case <-changed:
		t.Fatal("a change announced though nothing trusted changed")
	default:
	}

	// A file that is not JSON at all changes nothing.
	if err := os.WriteFile(path, []byte("{trunc"), 0o644); err != nil {
		t.Fatal(err)
	}
	LoadFederated(b, path, log)
	if len(b.Federated()) != 2 {
		t.Fatal("an unparsable file dropped the federation")
	}

	// b.example's federation removed: its entry is gone, and so is its trust.
	writeJSON(t, path, map[string]json.RawMessage{"a.example": aJSON})
	LoadFederated(b, path, log)
	if got := b.Federated(); len(got) != 1 || got[a] == nil {
		t.Fatalf("after b.example was removed: %v", got)
	}
	// Every federation removed: meshid-ca drops the key.
	os.Remove(path)
	LoadFederated(b, path, log)
	if len(b.Federated()) != 0 {
		t.Fatal("still federated after the file went")
	}
}

func FuzzParseFederatedBundles(f *testing.F) {
	own := spiffeid.RequireTrustDomainFromString("cluster.local")
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"a.example":{"keys":[]},"cluster.local":{"keys":[]}}`))
	f.Add([]byte(`{"a.example":{"spiffe_sequence":1,"keys":[{"use":"x509-svid","kty":"EC","crv":"P-256","x":"AA","y":"AA","x5c":["AA=="]}]}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, _, _ := ParseFederatedBundles(data, own)
		for td, b := range got {
			if td == own || b.TrustDomain() != td || (len(b.X509Authorities()) == 0 && len(b.JWTAuthorities()) == 0) {
				t.Fatalf("accepted %s: bundle of %s, %d X.509 and %d JWT authorities", td, b.TrustDomain(), len(b.X509Authorities()), len(b.JWTAuthorities()))
			}
		}
	})
}
