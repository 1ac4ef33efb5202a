package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/pgtest"
)

// TestRootRotation rotates the root of two meshid-ca replicas (CA in one
// Secret, one PostgreSQL ledger, on a real kube-apiserver) with meshidctl,
// through every stage, while two workloads, each behind its own
// meshid-agent and reading its SVID and bundle with go-spiffe, talk mTLS:
// over one connection held open throughout, and over a new connection
// every 100ms. web's agent asks replica a, through which meshidctl drives
// the rotation; api's asks replica b, which must follow each stage from the
// Secret. Not one handshake or round trip may fail. Replica a is killed
// with SIGKILL half way and resumes from the stored stage.
//
// What a kubelet would do (copy the bundle ConfigMap into the pod's mounted
// file) is done by the test, polling the ConfigMap.
func TestRootRotation(t *testing.T) {
	dsn := pgtest.Database(t)
	cluster := kubetest.Start(t)
	cluster.ServiceAccount(t, "meshid-system", "meshid-ca")
	cluster.ServiceAccount(t, "shop", "web")
	cluster.ServiceAccount(t, "shop", "api")
	cluster.ServiceAccount(t, "ops", "admin")
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dsnFile := filepath.Join(dir, "dsn")
	mustWrite(t, dsnFile, []byte(dsn), 0o600)

	replicaArgs := func(name string) (args []string, grpcAddr string) {
		grpcAddr = fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
		return []string{"--auth=tokenreview", "--kubeconfig=" + cluster.Kubeconfig,
			"--ca-source=secret", "--namespace=meshid-system", "--secret-name=meshid-ca", "--pod-name=" + name,
			"--ledger=postgres", "--ledger-dsn-file=" + dsnFile, "--rate-limit=0",
			"--grpc-addr=" + grpcAddr, "--admin-addr=" + fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t)), "--admin-service-accounts=ops/admin",
			// Short waits so the test runs in seconds; production
			// defaults are 30s and 2m.
			"--ca-sync-interval=1s", "--root-propagation=7s"}, grpcAddr
	}
	caArgs, grpcAddr := replicaArgs("ca-a")
	argsB, grpcAddrB := replicaArgs("ca-b")
	p := startCA(t, caArgs...)
	p.WaitReady(t, 60*time.Second)
	pB := startCA(t, argsB...)
	pB.WaitReady(t, 60*time.Second)
	// gauge tells whether a replica's gauge reads v.
	gauge := func(p *caProcess, name string, v int) bool {
		return strings.Contains(p.Metrics(t), "\n"+name+" "+strconv.Itoa(v)+"\n")
	}
	trustedRoots := func(p *caProcess, n int) bool { return gauge(p, "meshid_ca_trusted_roots", n) }

	// The kubelet's part: the shop namespace's bundle ConfigMap, copied
	// into the file the agents (and meshidctl) read.
	bundleFile := filepath.Join(dir, "root-cert.pem")
	cms := cluster.Client.CoreV1().ConfigMaps("shop")
	configMapRoots := func() []*x509.Certificate {
		cm, err := cms.Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			return nil
		}
		roots, _ := ca.ParseCertificatesPEM([]byte(cm.Data["root-cert.pem"]))
		return roots
	}
	syncBundle := func() bool {
		cm, err := cms.Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			return false
		}
		data := []byte(cm.Data["root-cert.pem"])
		if old, _ := os.ReadFile(bundleFile); string(old) == string(data) {
			return true
		}
		tmp := bundleFile + ".tmp"
		if os.WriteFile(tmp, data, 0o644) != nil || os.Rename(tmp, bundleFile) != nil {
			t.Errorf("writing the bundle file failed")
		}
		return true
	}
	waitUntil(t, 60*time.Second, "the bundle ConfigMap in shop", syncBundle)
	go func() {
		for ctx.Err() == nil {
			syncBundle()
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond): // the kubelet's refresh, much shortened
			}
		}
	}()
	firstRoots := readRoots(t, bundleFile)
	if len(firstRoots) != 1 {
		t.Fatalf("bundle holds %d roots at start, want 1", len(firstRoots))
	}
	oldRoot := firstRoots[0]

	webID := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/web")
	apiID := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/api")
	source := func(sa, grpcAddr string) *workloadapi.X509Source {
		tokenFile := filepath.Join(dir, sa+".token")
		mustWrite(t, tokenFile, []byte(cluster.Token(t, "shop", sa, "istio-ca")), 0o600)
		socket := shortSocket(t)
		startAgent(t, "--ca-addr="+grpcAddr, "--ca-server-name=localhost", "--ca-root-file="+bundleFile,
			"--namespace=shop", "--service-account="+sa, "--token-file="+tokenFile,
			"--sds-socket="+socket, "--cert-ttl=10s")
		sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
		defer scancel()
		src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socket)))
		if err != nil {
			t.Fatalf("go-spiffe X509Source for %s: %v", sa, err)
		}
		t.Cleanup(func() { src.Close() })
		return src
	}
	web, api := source("web", grpcAddr), source("api", grpcAddrB)

	// api serves an echo over mTLS, accepting only web; web accepts only api.
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(api, api, tlsconfig.AuthorizeID(webID)))
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := c.Write([]byte(line)); err != nil {
						return
					}
				}
			}()
		}
	}()
	clientTLS := tlsconfig.MTLSClientConfig(web, web, tlsconfig.AuthorizeID(apiID))
	roundTrip := func(c net.Conn, r *bufio.Reader, msg string) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte(msg + "\n")); err != nil {
			return err
		}
		got, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if got != msg+"\n" {
			return fmt.Errorf("echo %q, want %q", got, msg)
		}
		return nil
	}

	var (
		newOK, newFailed, heldOK, heldFailed atomic.Int64
		errMu                                sync.Mutex
		errs                                 []string
	)
	fail := func(what string, err error) {
		errMu.Lock()
		defer errMu.Unlock()
		if len(errs) < 10 {
			errs = append(errs, fmt.Sprintf("%s %s: %v", time.Now().Format(time.TimeOnly), what, err))
		}
	}
	held, err := tls.Dial("tcp", lis.Addr().String(), clientTLS)
	if err != nil {
		t.Fatalf("first mTLS connection: %v", err)
	}
	defer held.Close()
	heldReader := bufio.NewReader(held)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond): // traffic pace
			}
			if err := roundTrip(held, heldReader, "held "+strconv.Itoa(i)); err != nil {
				heldFailed.Add(1)
				fail("held connection", err)
				continue
			}
			heldOK.Add(1)
		}
	})
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond): // traffic pace
			}
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", lis.Addr().String(), clientTLS)
			if err == nil {
				err = roundTrip(c, bufio.NewReader(c), "new "+strconv.Itoa(i))
				c.Close()
			}
			if err != nil {
				newFailed.Add(1)
				fail("new connection", err)
				continue
			}
			newOK.Add(1)
		}
	})
	// traffic waits until both kinds of connection have made progress.
	traffic := func(what string) {
		t.Helper()
		h, n := heldOK.Load(), newOK.Load()
		waitUntil(t, 30*time.Second, "traffic "+what, func() bool { return heldOK.Load() >= h+5 && newOK.Load() >= n+5 })
	}
	traffic("before the rotation")

	adminToken := filepath.Join(dir, "admin.token")
	mustWrite(t, adminToken, []byte(cluster.Token(t, "ops", "admin", "istio-ca")), 0o600)
	c := &ctl{t: t, p: p, caFile: bundleFile, tokFile: adminToken}
	stage := func() map[string]any {
		t.Helper()
		out, errOut, code := c.run("root", "status", "-o", "json")
		if code != 0 {
			t.Fatalf("meshidctl root status: exit %d: %s", code, errOut)
		}
		var st map[string]any
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("root status -o json: %v\n%s", err, out)
		}
		return st
	}
	rotate := func(args ...string) {
		t.Helper()
		out, errOut, code := c.run(append([]string{"root", "rotate", "--poll=200ms", "--timeout=20s"}, args...)...)
		if code != 0 {
			t.Fatalf("meshidctl root rotate %v: exit %d\n%s\n%s", args, code, out, errOut)
		}
		t.Logf("meshidctl root rotate %v:\n%s", args, errOut)
	}
	bundleOf := func(src *workloadapi.X509Source) []*x509.Certificate {
		b, err := src.GetX509BundleForTrustDomain(webID.TrustDomain())
		if err != nil {
			return nil
		}
		return b.X509Authorities()
	}
	chainsTo := func(src *workloadapi.X509Source, root *x509.Certificate) bool {
		svid, err := src.GetX509SVID()
		if err != nil {
			return false
		}
		pool := x509.NewCertPool()
		pool.AddCert(root)
		inter := x509.NewCertPool()
		for _, c := range svid.Certificates[1:] {
			inter.AddCert(c)
		}
		_, err = svid.Certificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		return err == nil
	}

	// prepare: a new root exists, trusted by no one yet.
	if st := stage(); st["stage"] != "none" || st["next_step"] != "prepare" {
		t.Fatalf("before: stage %v, next %v", st["stage"], st["next_step"])
	}
	rotate()
	st := stage()
	if st["stage"] != "prepared" {
		t.Fatalf("after one rotate: stage %v, want prepared", st["stage"])
	}
	if n := len(configMapRoots()); n != 1 {
		t.Fatalf("prepared: the ConfigMap holds %d roots, want 1", n)
	}
	traffic("once prepared")

	// distribute: the new root joins every bundle.
	rotate("--wait", "--until=distributed")
	// The old root and one other, in either order (Istio's agent does not
	// keep the order it was sent).
	both := func(roots []*x509.Certificate) bool {
		return len(roots) == 2 && !roots[0].Equal(roots[1]) && slices.ContainsFunc(roots, oldRoot.Equal)
	}
	waitUntil(t, 30*time.Second, "both roots in the ConfigMap", func() bool { return both(configMapRoots()) })
	newRoot := configMapRoots()[1] // meshid appends it
	if newRoot.Equal(oldRoot) {
		t.Fatal("the ConfigMap lists the old root last")
	}
	waitUntil(t, 30*time.Second, "both roots in both workloads' bundles", func() bool { return both(bundleOf(web)) && both(bundleOf(api)) })
	if !chainsTo(web, oldRoot) {
		t.Fatal("distributed: web's SVID does not chain to the old root, which still signs")
	}
	// Istio's own agent takes its ROOTCA from the CA's answer, not the
	// ConfigMap: it must get both roots too.
	_, grpcPort, _ := net.SplitHostPort(grpcAddr)
	istioAgent := func(stage string, signingRoot *x509.Certificate) {
		t.Helper()
		_, chainPEM, rootPEM := istioAgentCerts(t, pilotAgentDir(t), grpcPort, bundleFile,
			// A short certificate, as the agents': the ledger rightly holds
			// the retirement back while one from the old root is valid.
			cluster.Token(t, "shop", "web", "istio-ca"), "shop", "web", "web-0", []string{"SECRET_TTL=10s"})
		roots, err := ca.ParseCertificatesPEM(rootPEM)
		if err != nil || !both(roots) {
			t.Fatalf("%s: Istio's agent's root file holds %d roots (%v), want the old and the new", stage, len(roots), err)
		}
		chain, err := ca.ParseCertificatesPEM(chainPEM)
		if err != nil {
			t.Fatal(err)
		}
		// The file may end with the roots; verify the rest against the
		// root that signs now.
		for len(chain) > 1 && chain[len(chain)-1].CheckSignatureFrom(chain[len(chain)-1]) == nil {
			chain = chain[:len(chain)-1]
		}
		verifySVID(t, stage+": Istio's agent's certificate", append(chain, signingRoot), webID.TrustDomain(), []*x509.Certificate{signingRoot}, webID)
	}
	istioAgent("distributed", oldRoot)
	waitUntil(t, 10*time.Second, "replica b serving both roots", func() bool {
		return trustedRoots(pB, 2) && gauge(pB, "meshid_ca_root_rotation_stage", 2)
	})
	traffic("once distributed")

	// Replica a dies without warning; restarted, it resumes at the stored
	// stage.
	p.cmd.Process.Kill()
	<-p.exited
	p = startCA(t, caArgs...)
	p.WaitReady(t, 60*time.Second)
	c.p = p
	if st := stage(); st["stage"] != "distributed" || st["next_step"] != "switch" {
		t.Fatalf("after the CA restarted: stage %v, next %v; want distributed, switch", st["stage"], st["next_step"])
	}
	traffic("after the CA restarted")

	// switch, then retire, each once its checks pass.
	rotate("--wait", "--until=switched")
	waitUntil(t, 30*time.Second, "both workloads' SVIDs from the new root", func() bool { return chainsTo(web, newRoot) && chainsTo(api, newRoot) })
	istioAgent("switched", newRoot)
	waitUntil(t, 10*time.Second, "replica b at the switched stage", func() bool { return gauge(pB, "meshid_ca_root_rotation_stage", 3) })
	if out, errOut, code := c.run("check"); code != 0 || !strings.Contains(out, "under way at stage switched") {
		t.Errorf("meshidctl check during the rotation: exit %d, no rotation warning\n%s%s", code, out, errOut)
	}
	traffic("once switched")
	rotate("--wait")
	if st := stage(); st["stage"] != "none" {
		t.Fatalf("after rotate --wait: stage %v, want none", st["stage"])
	}
	only := func(roots []*x509.Certificate) bool { return len(roots) == 1 && roots[0].Equal(newRoot) }
	waitUntil(t, 30*time.Second, "only the new root in the ConfigMap", func() bool { return only(configMapRoots()) })
	waitUntil(t, 10*time.Second, "both replicas serving the new root alone", func() bool {
		return trustedRoots(p, 1) && trustedRoots(pB, 1) && gauge(p, "meshid_ca_root_rotation_stage", 0) && gauge(pB, "meshid_ca_root_rotation_stage", 0)
	})
	waitUntil(t, 30*time.Second, "only the new root in both workloads' bundles", func() bool { return only(bundleOf(web)) && only(bundleOf(api)) })
	sec, err := cluster.Client.CoreV1().Secrets("meshid-system").Get(ctx, "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if stored, err := ca.ParseCertificatesPEM(sec.Data["root-cert.pem"]); err != nil || !only(stored) {
		t.Fatalf("the Secret's root-cert.pem does not hold the new root alone (%v)", err)
	}
	for _, name := range []string{"rotation.json", "next-root-key.pem", "next-ca-key.pem"} {
		if _, ok := sec.Data[name]; ok {
			t.Errorf("the Secret still holds %s after the rotation", name)
		}
	}
	traffic("once retired")

	close(stop)
	wg.Wait()
	t.Logf("mTLS through the rotation: %d round trips on the held connection, %d new connections; failed: %d, %d",
		heldOK.Load(), newOK.Load(), heldFailed.Load(), newFailed.Load())
	if heldFailed.Load() > 0 || newFailed.Load() > 0 {
		t.Errorf("%d held-connection and %d new-connection failures: %v", heldFailed.Load(), newFailed.Load(), errs)
	}
}

// waitUntil polls cond until it holds, failing t after within.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s", what, within)
		}
		time.Sleep(50 * time.Millisecond) // poll interval
	}
}
