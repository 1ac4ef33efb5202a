package workloadapi_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/internal/catest"
	"github.com/meshid/meshid/internal/poll"
)

// TestGoSpiffeFederation: a meshid workload, through go-spiffe's own
// X509Source, talks mTLS with a workload of another trust domain only
// while meshid federates with it; the bundles reach go-spiffe on open
// streams, without a reconnect.
func TestGoSpiffeFederation(t *testing.T) {
	c := catest.New(t)
	other := spiffeid.RequireTrustDomainFromString("other.example")
	peerCA := catest.NewIn(t, other.String())
	peerID := spiffeid.RequireFromPath(other, "/ns/pay/sa/api")
	clientID := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	bundle := agent.NewBundle(td, []*x509.Certificate{c.Root()})
	addr := serveBundle(t, c, clientID, time.Hour, bundle)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// FetchX509Bundles' own stream, watched the whole test.
	x509Bundles := make(chan *x509bundle.Set, 16)
	go client.WatchX509Bundles(ctx, bundlesWatcher(x509Bundles))
	waitBundles := func(what string, ok func(*x509bundle.Set) bool) {
		t.Helper()
		for {
			select {
			case set := <-x509Bundles:
				if ok(set) {
					return
				}
			case <-ctx.Done():
				t.Fatalf("FetchX509Bundles never sent %s", what)
			}
		}
	}

	// The peer: its own SVID, and meshid's bundle given to it (as its
	// SPIRE server would, federating back).
	chain, key := peerCA.IssueFor(t, peerID)
	peerSVID := &x509svid.SVID{ID: peerID, Certificates: chain[:len(chain)-1], PrivateKey: key}
	peerTrust := x509bundle.NewSet(x509bundle.FromX509Authorities(td, []*x509.Certificate{c.Root()}), x509bundle.FromX509Authorities(other, []*x509.Certificate{peerCA.Root()}))
	lis := echoServer(t, tlsconfig.MTLSServerConfig(peerSVID, peerTrust, tlsconfig.AuthorizeMemberOf(td)))
	dial := func() error {
		conn, err := tls.Dial("tcp", lis.Addr().String(), tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(peerID)))
		if err != nil {
			return err
		}
		defer conn.Close()
		echo(t, conn)
		return nil
	}
	if err := dial(); err == nil {
		t.Fatal("the peer was trusted before meshid federated with other.example")
	}

	bundle.SetFederated(map[spiffeid.TrustDomain]*spiffebundle.Bundle{other: spiffebundle.FromX509Authorities(other, []*x509.Certificate{peerCA.Root()})})
	poll.Until(t, "other.example's bundle in go-spiffe's X509Source", func() bool {
		_, err := src.GetX509BundleForTrustDomain(other)
		return err == nil
	})
	if err := dial(); err != nil {
		t.Fatalf("the peer is not trusted after federation: %v", err)
	}
	waitBundles("other.example's bundle beside the own", func(set *x509bundle.Set) bool {
		b, err1 := set.GetX509BundleForTrustDomain(other)
		own, err2 := set.GetX509BundleForTrustDomain(td)
		return err1 == nil && err2 == nil && b.HasX509Authority(peerCA.Root()) && own.HasX509Authority(c.Root())
	})

	// A peer's CA cannot vouch for meshid's trust domain: a certificate it
	// signs for a meshid identity is refused by the meshid workload.
	forgedChain, _ := peerCA.IssueFor(t, spiffeid.RequireFromPath(td, "/ns/shop/sa/api"))
	set, _ := src.GetX509BundleForTrustDomain(td)
	if _, _, err := x509svid.Verify(forgedChain[:1], x509bundle.NewSet(set)); err == nil {
		t.Error("meshid's bundle for its own trust domain accepts a certificate the peer signed")
	}

	// The federation removed: refused again, on the same streams.
	bundle.SetFederated(nil)
	poll.Until(t, "other.example gone from go-spiffe's X509Source", func() bool {
		_, err := src.GetX509BundleForTrustDomain(other)
		return err != nil
	})
	if err := dial(); err == nil {
		t.Fatal("the peer is still trusted after the federation was removed")
	}
	waitBundles("the own bundle alone", func(set *x509bundle.Set) bool {
		return set.Len() == 1 && set.Has(td)
	})
}

type bundlesWatcher chan *x509bundle.Set

func (w bundlesWatcher) OnX509BundlesUpdate(set *x509bundle.Set) { w <- set }
func (w bundlesWatcher) OnX509BundlesWatchError(error)           {}
