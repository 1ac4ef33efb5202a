package sds_test

import (
	"crypto/x509"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/sds"
)

var other = spiffeid.RequireTrustDomainFromString("other.example")

// envoyTrusts verifies chain as Envoy's SPIFFE certificate validator does
// with the validation context of sec: by the bundle of the trust domain the
// chain's leaf names, and only by it.
func envoyTrusts(t *testing.T, sec *tlsv3.Secret, chain []*x509.Certificate) error {
	t.Helper()
	vc := sec.GetValidationContext()
	if vc.GetCustomValidatorConfig().GetName() != sds.SPIFFEValidatorName {
		t.Fatalf("%s is not a SPIFFE validator: %v", sec.Name, vc)
	}
	byTD, err := sds.TrustedRoots(vc)
	if err != nil {
		t.Fatal(err)
	}
	set := x509bundle.NewSet()
	for td, roots := range byTD {
		set.Add(x509bundle.FromX509Authorities(td, roots))
	}
	_, _, err = x509svid.Verify(chain, set)
	return err
}

func TestServesFederatedBundles(t *testing.T) {
	f := start(t, time.Hour)
	root := f.open(t, sds.RootCertName)
	named := f.open(t, other.IDString())
	all := f.open(t, sds.AllBundlesName)

	first := root.next(10 * time.Second)
	if vc := secrets(t, first)[0].GetValidationContext(); vc.GetTrustedCa() == nil || vc.GetCustomValidatorConfig() != nil {
		t.Fatalf("without federation ROOTCA must be a trusted CA set: %v", vc)
	}
	root.ack(first)

	peer := catest.NewIn(t, other.String())
	peerChain, _ := peer.IssueFor(t, spiffeid.RequireFromPath(other, "/ns/pay/sa/api"))
	// A peer's CA vouching for an identity of meshid's trust domain.
	forged, _ := peer.IssueFor(t, web)
	ownChain, _ := f.ca.IssueFor(t, web)

	// Before federation the named validator trusts none of other.example's.
	resp := named.next(10 * time.Second)
	if err := envoyTrusts(t, secrets(t, resp)[0], peerChain); err == nil {
		t.Fatal("spiffe://other.example trusted a peer certificate before federation")
	}
	named.ack(resp)

	f.bundle.SetFederated(map[spiffeid.TrustDomain]*spiffebundle.Bundle{other: spiffebundle.FromX509Authorities(other, []*x509.Certificate{peer.Root()})})

	fed := secrets(t, root.next(5*time.Second))[0]
	if fed.GetValidationContext().GetTrustedCa() != nil {
		t.Fatal("with federation ROOTCA still carries a combined trusted CA set")
	}
	byTD, err := sds.TrustedRoots(fed.GetValidationContext())
	if err != nil || len(byTD) != 2 || !byTD[other][0].Equal(peer.Root()) || !byTD[spiffeid.RequireTrustDomainFromString("cluster.local")][0].Equal(f.ca.Root()) {
		t.Fatalf("ROOTCA with federation holds %v (%v), want cluster.local and other.example each with its root", byTD, err)
	}
	if err := envoyTrusts(t, fed, peerChain); err != nil {
		t.Errorf("ROOTCA refuses the federated peer: %v", err)
	}
	if err := envoyTrusts(t, fed, ownChain); err != nil {
		t.Errorf("ROOTCA refuses meshid's own workload: %v", err)
	}
	if err := envoyTrusts(t, fed, forged); err == nil {
		t.Error("ROOTCA lets the peer's CA vouch for spiffe://cluster.local")
	}

	one := secrets(t, named.next(5*time.Second))[0]
	if err := envoyTrusts(t, one, peerChain); err != nil {
		t.Errorf("spiffe://other.example refuses the peer: %v", err)
	}
	if err := envoyTrusts(t, one, ownChain); err == nil {
		t.Error("spiffe://other.example trusts meshid's own trust domain too")
	}
	var allSec *tlsv3.Secret
	for allSec == nil || len(mustRoots(t, allSec)) < 2 {
		allSec = secrets(t, all.next(5*time.Second))[0]
	}
	if err := envoyTrusts(t, allSec, peerChain); err != nil {
		t.Errorf("ALL refuses the peer: %v", err)
	}

	// The federation removed: every stream is told at once.
	f.bundle.SetFederated(nil)
	back := secrets(t, root.next(5*time.Second))[0]
	if back.GetValidationContext().GetTrustedCa() == nil {
		t.Fatal("ROOTCA after the federation was removed is not the own roots")
	}
	gone := secrets(t, named.next(5*time.Second))[0]
	if err := envoyTrusts(t, gone, peerChain); err == nil {
		t.Error("spiffe://other.example still trusts the peer after the federation was removed")
	}
}

func mustRoots(t *testing.T, sec *tlsv3.Secret) map[spiffeid.TrustDomain][]*x509.Certificate {
	t.Helper()
	m, err := sds.TrustedRoots(sec.GetValidationContext())
	if err != nil {
		t.Fatal(err)
	}
	return m
}
