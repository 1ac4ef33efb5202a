package e2e

import (
	"context"
	"crypto/x509"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/poll"
	"github.com/meshid/meshid/internal/satoken"
	"github.com/meshid/meshid/internal/steptest"
)

// TestStepCAUpstream: meshid-ca gets its intermediate from a real step-ca
// (--ca-source=step), and Istio's pilot-agent and a go-spiffe workload
// (through meshid-agent) get certificates that chain to step-ca's root.
func TestStepCAUpstream(t *testing.T) {
	agentDir := pilotAgentDir(t)
	s := steptest.Start(t, steptest.Options{})
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "step-root.pem")
	mustWrite(t, rootFile, ca.EncodePEM(s.Root), 0o644)
	passFile := filepath.Join(dir, "step-password")
	mustWrite(t, passFile, []byte(s.Provisioner.Password+"\n"), 0o600)
	stateDir := filepath.Join(dir, "state")
	issuer, args := jwksCAArgs(t, dir, stateDir)
	stepArgs := []string{"--ca-source=step", "--ca-store=dir", "--step-ca-url=" + s.URL, "--step-root-file=" + rootFile,
		"--step-provisioner=" + s.Provisioner.Name, "--intermediate-ttl=72h"}

	// A wrong password stops meshid-ca at start, saying so.
	bad := filepath.Join(dir, "bad-password")
	mustWrite(t, bad, []byte("not-it"), 0o600)
	wrong := launchCA(t, append(append(args[1:], stepArgs...), "--step-password-file="+bad)...)
	select {
	case <-wrong.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("meshid-ca with a wrong step-ca password did not stop")
	}
	if log := wrong.Log(); !strings.Contains(log, "wrong password") || !strings.Contains(log, s.URL) {
		t.Errorf("meshid-ca's words on a wrong password:\n%s", log)
	}

	p := startCA(t, append(append(args[1:], stepArgs...), "--step-password-file="+passFile, "--ca-sync-interval=200ms")...)
	p.WaitReady(t, 60*time.Second)
	if recs := p.LogRecords("CA intermediate signed by step-ca"); len(recs) != 1 {
		t.Errorf("no log line of the intermediate step-ca signed")
	}
	roots := readRoots(t, filepath.Join(stateDir, "ca", "root-cert.pem"))
	if len(roots) != 1 || !roots[0].Equal(s.Root) {
		t.Fatalf("meshid-ca's trust bundle is not step-ca's root")
	}

	// Istio's own agent.
	_, grpcPort, err := net.SplitHostPort(p.GRPCAddr)
	if err != nil {
		t.Fatal(err)
	}
	const ns, sa, pod = "istio-e2e", "web", "web-5d8f7c9b4-x2k7q"
	token, err := issuer.Token(satoken.Claims{Namespace: ns, ServiceAccount: sa, PodName: pod, PodUID: "0b6f3c1e-7a2d-4e5f-9c8b-1a2b3c4d5e6f", Audiences: []string{"istio-ca"}})
	if err != nil {
		t.Fatal(err)
	}
	_, chainPEM, rootPEM := istioAgentCerts(t, agentDir, grpcPort, rootFile, token, ns, sa, pod, []string{"ECC_SIGNATURE_ALGORITHM=ECDSA"})
	chain, err := ca.ParseCertificatesPEM(chainPEM)
	if err != nil {
		t.Fatal(err)
	}
	if last := chain[len(chain)-1]; last.Equal(s.Root) {
		chain = chain[:len(chain)-1]
	}
	if len(chain) != 3 || !chain[2].Equal(s.Intermediate) {
		t.Errorf("pilot-agent's chain has %d certificates below the root, want leaf, meshid's intermediate, step-ca's", len(chain))
	}
	verifySVID(t, "pilot-agent's cert-chain.pem under step-ca", append(chain, s.Root), td, []*x509.Certificate{s.Root}, spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/"+sa))
	if agentRoots, err := ca.ParseCertificatesPEM(rootPEM); err != nil || len(agentRoots) != 1 || !agentRoots[0].Equal(s.Root) {
		t.Errorf("pilot-agent's root-cert.pem is not step-ca's root")
	}

	// A go-spiffe workload, through meshid-agent's Workload API.
	socket := shortSocket(t)
	startAgent(t, podAgentArgs(t, issuer, dir, stateDir, p.GRPCAddr, socket)...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
	if err != nil {
		t.Fatalf("go-spiffe X509Source: %v", err)
	}
	defer src.Close()
	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, []*x509.Certificate{s.Root}))
	if err != nil || id.String() != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Errorf("go-spiffe: the SVID does not verify to step-ca's root: %v (%s)", err, id)
	}
	if b, err := src.GetX509BundleForTrustDomain(td); err != nil || len(b.X509Authorities()) != 1 || !b.X509Authorities()[0].Equal(s.Root) {
		t.Errorf("go-spiffe's bundle is not step-ca's root: %v", err)
	}

	// step-ca's operators add their next root to --step-root-file: meshid-ca
	// serves both without a restart, and go-spiffe's bundle gets both.
	next := steptest.Start(t, steptest.Options{})
	mustWrite(t, rootFile, append(ca.EncodePEM(s.Root), ca.EncodePEM(next.Root)...), 0o644)
	poll.Until(t, "meshid-ca serving both roots", func() bool {
		return strings.Contains(p.Metrics(t), "meshid_ca_trusted_roots 2")
	})
	if !strings.Contains(p.Log(), "--step-root-file changed") {
		t.Error("no log line of the root file's change")
	}
}

// TestStepCAReplicasShareOneIntermediate: two meshid-ca replicas under one
// step-ca, starting together with --ca-store=secret, end signing with the
// same intermediate, the one the Secret holds.
func TestStepCAReplicasShareOneIntermediate(t *testing.T) {
	s := steptest.Start(t, steptest.Options{})
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "meshid-system", "meshid-ca")
	cluster.ServiceAccount(t, "shop", "web")
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "step-root.pem")
	mustWrite(t, rootFile, ca.EncodePEM(s.Root), 0o644)
	passFile := filepath.Join(dir, "step-password")
	mustWrite(t, passFile, []byte(s.Provisioner.Password), 0o600)
	args := []string{"--auth=tokenreview", "--kubeconfig=" + cluster.Kubeconfig, "--namespace=meshid-system",
		"--ca-source=step", "--ca-store=secret", "--secret-name=meshid-ca", "--step-ca-url=" + s.URL,
		"--step-root-file=" + rootFile, "--step-provisioner=" + s.Provisioner.Name, "--step-password-file=" + passFile, "--intermediate-ttl=72h"}
	replicas := []*caProcess{launchCA(t, args...), launchCA(t, args...)}
	for _, p := range replicas {
		p.WaitServing(t)
	}
	for _, p := range replicas {
		p.WaitReady(t, 60*time.Second)
	}
	sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(context.Background(), "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stored, err := ca.ParseCertificatesPEM(sec.Data[keys.CACertFile])
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := sec.Data[keys.RootKeyFile]; ok {
		t.Error("the Secret holds a root key: step-ca's root key is step-ca's")
	}
	token := cluster.Token(t, "shop", "web", "istio-ca")
	web := spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("cluster.local"), "/ns/shop/sa/web")
	for i, p := range replicas {
		chain, err := sign(context.Background(), p.Client(t, []*x509.Certificate{s.Root}), web, token)
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
		if !chain[1].Equal(stored[0]) {
			t.Errorf("replica %d signs with intermediate %s, the Secret holds %s", i, ca.Fingerprint(chain[1]), ca.Fingerprint(stored[0]))
		}
		if !chain[len(chain)-1].Equal(s.Root) {
			t.Errorf("replica %d: the answer does not end with step-ca's root", i)
		}
	}
}
