package faults

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/pgtest"

	_ "modernc.org/sqlite" // the ledger's SQLite, read by the checks
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// params size a world: how many workloads, how long certificates live.
type params struct {
	sdsWorkloads, apiWorkloads int
	ttl                        time.Duration
	// sqliteDir, when set, makes the world one meshid-ca on a SQLite
	// ledger in that directory (a small filesystem of its own), instead of
	// two replicas on PostgreSQL.
	sqliteDir string
	// caChanges makes both replicas keep the CA in the Secret, with an
	// intermediate of intermediateTTL and the admin API on, so that the
	// intermediate is renewed and the root rotated under load.
	caChanges       bool
	intermediateTTL time.Duration
}

// world is meshid as deployed, with a fault point on every connection:
//
//	workloads ─(Unix socket)─ meshid-agent ─[agentCA link]─ balancer ─┬─ meshid-ca A ─┬─[pg link]─ PostgreSQL
//	                              │                                    └─ meshid-ca B ─┘
//	                              └──────────────[api front]───────────── kube-apiserver (both CAs too)
type world struct {
	t      *testing.T
	p      params
	kube   *kubetest.Cluster
	front  *apiFront
	pg     *link
	dsn    string // PostgreSQL directly, for the ledger checks
	cas    []*proc
	lb     *balancer
	toCA   *link // agent ↔ CA
	agent  *proc
	socket string
	trust  atomic.Pointer[trust] // the bundle workloads and clients trust now
	// rootFile is the trust bundle the agent (and meshidctl) read, kept as
	// the bundle ConfigMap is, as a kubelet keeps a mounted one.
	rootFile string
	dir      string

	clockFile  string // the agent's clock skew (a test build's flag)
	adminToken string // a file: ops/admin's token, for meshidctl

	pluginDir   string            // ca-b's cacerts
	pluginFiles map[string][]byte // their good contents

	workloads []*workload
	probe     *prober
	stop      context.CancelFunc
	checker   sync.WaitGroup
}

// trust is a trust bundle, parsed and pooled.
type trust struct {
	pem   []byte
	roots []*x509.Certificate
	pool  *x509.CertPool
}

func newTrust(pem []byte) (*trust, error) {
	roots, err := ca.ParseCertificatesPEM(pem)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	return &trust{pem: pem, roots: roots, pool: pool}, nil
}

func (w *world) roots() []*x509.Certificate { return w.trust.Load().roots }
func (w *world) pool() *x509.CertPool       { return w.trust.Load().pool }

func newWorld(t *testing.T, p params) *world {
	t.Helper()
	w := &world{t: t, p: p}
	w.kube = kubetest.Start(t)
	w.kube.ServiceAccount(t, "meshid-system", "meshid-ca")
	w.front = newAPIFront(t, w.kube.Config)
	dir := t.TempDir()
	w.dir = dir
	ledgerArgs := []string{"--ledger=sqlite", "--ledger-dsn=" + filepath.Join(p.sqliteDir, "ledger.db")}
	if p.sqliteDir == "" {
		w.dsn = pgtest.Database(t)
		pgHost := strings.SplitN(strings.SplitN(w.dsn, "@", 2)[1], "/", 2)[0]
		w.pg = newLink(t, "ca-postgres", pgHost)
		caDSN := strings.Replace(w.dsn, "@"+pgHost+"/", "@"+w.pg.Addr+"/", 1)
		dsnFile := filepath.Join(dir, "dsn")
		if err := os.WriteFile(dsnFile, []byte(caDSN), 0o600); err != nil {
			t.Fatal(err)
		}
		ledgerArgs = []string{"--ledger=postgres", "--ledger-dsn-file=" + dsnFile}
	}
	common := []string{
		"--grpc-addr=127.0.0.1:0", "--http-addr=127.0.0.1:0", "--admin-addr=127.0.0.1:0", "--bundle-endpoint-addr=127.0.0.1:0",
		"--log-format=json",
		"--auth=kubernetes", "--kubeconfig=" + w.front.Kubeconfig, "--namespace=meshid-system",
		// Faults last longer than a cached token decision.
		"--token-cache-ttl=5s", "--token-negative-cache-ttl=2s",
	}
	// A keeps the CA in a Secret (generating it); B is a plug-in CA
	// (Istio's cacerts) of the same material, so that both sign under one
	// root and B's files can be spoilt.
	common = append(common, ledgerArgs...)
	if p.caChanges {
		w.kube.ServiceAccount(t, "ops", "admin")
		common = append(common, "--intermediate-ttl="+p.intermediateTTL.String(), "--ca-sync-interval=1s", "--root-propagation=5s",
			"--admin-service-accounts=ops/admin")
	}
	a := startProc(t, "ca-a", "meshid-ca", "meshid-ca serving", append(common, "--pod-name=ca-a", "--ca-source=secret", "--secret-name=meshid-ca")...)
	waitReady(t, a, 60*time.Second)
	sec, err := w.kube.Client.CoreV1().Secrets("meshid-system").Get(context.Background(), "meshid-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := newTrust(sec.Data[keys.RootCertFile])
	if err != nil {
		t.Fatal(err)
	}
	w.trust.Store(first)
	w.pluginDir = filepath.Join(dir, "cacerts")
	w.pluginFiles = map[string][]byte{}
	for _, f := range []string{keys.CACertFile, keys.CAKeyFile, keys.CertChainFile, keys.RootCertFile} {
		w.pluginFiles[f] = sec.Data[f]
	}
	w.writePlugin(w.pluginFiles)
	w.cas = []*proc{a}
	switch {
	case p.caChanges:
		b := startProc(t, "ca-b", "meshid-ca", "meshid-ca serving", append(common, "--pod-name=ca-b", "--ca-source=secret", "--secret-name=meshid-ca")...)
		waitReady(t, b, 60*time.Second)
		w.cas = append(w.cas, b)
	case p.sqliteDir == "":
		b := startProc(t, "ca-b", "meshid-ca", "meshid-ca serving", append(common, "--pod-name=ca-b", "--ca-source=plugin", "--plugin-dir="+w.pluginDir, "--plugin-poll-interval=1s")...)
		waitReady(t, b, 60*time.Second)
		w.cas = append(w.cas, b)
	}
	w.rootFile = filepath.Join(dir, "root-cert.pem")
	if err := os.WriteFile(w.rootFile, sec.Data[keys.RootCertFile], 0o644); err != nil {
		t.Fatal(err)
	}

	w.lb = newBalancer(t, func() []string {
		var addrs []string
		for _, c := range w.cas {
			addrs = append(addrs, c.Addr())
		}
		return addrs
	})
	w.toCA = newLink(t, "agent-ca", w.lb.Addr)
	w.socket = shortSocket(t)
	w.clockFile = filepath.Join(dir, "agent-clock-skew")
	w.setAgentClock(0)
	w.agent = startProc(t, "agent", "meshid-agent", "meshid-agent started", "--test-clock-skew-file="+w.clockFile,
		"--mode=node", "--auth=tokenreview", "--kubeconfig="+w.front.Kubeconfig,
		"--ca-addr="+w.toCA.Addr, "--ca-server-name=localhost", "--ca-root-file="+w.rootFile,
		"--sds-socket="+w.socket, "--http-addr=127.0.0.1:0", "--cert-ttl="+p.ttl.String(), "--log-format=json")

	ctx, cancel := context.WithCancel(context.Background())
	w.stop = cancel
	t.Cleanup(func() { cancel(); w.checker.Wait() })
	for i := range p.sdsWorkloads + p.apiWorkloads {
		kind := "sds"
		if i >= p.sdsWorkloads {
			kind = "workload-api"
		}
		sa := fmt.Sprintf("%s-%d", strings.ReplaceAll(kind, "-", ""), i)
		w.kube.ServiceAccount(t, "apps", sa)
		wl := &workload{kind: kind, id: spiffeid.RequireFromPath(td, "/ns/apps/sa/"+sa), token: w.kube.Token(t, "apps", sa, "istio-ca"), trust: w.pool}
		w.workloads = append(w.workloads, wl)
		w.checker.Add(1)
		go func() {
			defer w.checker.Done()
			if kind == "sds" {
				wl.followSDS(ctx, w.socket)
			} else {
				wl.watchWorkloadAPI(ctx, w.socket)
			}
		}()
	}
	w.kube.ServiceAccount(t, "apps", "probe")
	w.probe = newProber(t, w, w.kube.Token(t, "apps", "probe", "istio-ca"))
	w.checker.Add(3)
	go func() { defer w.checker.Done(); w.probe.run(ctx) }()
	go func() { defer w.checker.Done(); w.followBundle(ctx) }()
	go func() {
		defer w.checker.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				for _, wl := range w.workloads {
					wl.check(now)
				}
			}
		}
	}()
	return w
}

// writePlugin replaces ca-b's plug-in CA files, each atomically (as a
// Secret volume's update is).
func (w *world) writePlugin(files map[string][]byte) {
	w.t.Helper()
	if err := os.MkdirAll(w.pluginDir, 0o700); err != nil {
		w.t.Fatal(err)
	}
	for name, data := range files {
		if err := writeAtomic(filepath.Join(w.pluginDir, name), data, 0o600); err != nil {
			w.t.Fatal(err)
		}
	}
}

// writeAtomic replaces path with data in one rename, so that a reader
// polling it never sees half a file.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// followBundle keeps rootFile and the trust of workloads and clients as
// the leader keeps the bundle ConfigMap of the workloads' namespace.
func (w *world) followBundle(ctx context.Context) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		cm, err := w.kube.Client.CoreV1().ConfigMaps("apps").Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			continue
		}
		pem := []byte(cm.Data[keys.RootCertFile])
		if string(pem) == string(w.trust.Load().pem) {
			continue
		}
		next, err := newTrust(pem)
		if err != nil {
			continue
		}
		// Trusted here before the agent reads it: what it then receives
		// is checked against the bundle it could have.
		w.trust.Store(next)
		if err := writeAtomic(w.rootFile, pem, 0o644); err != nil {
			w.t.Errorf("writing the agent's root file: %v", err)
		}
	}
}

// setAgentClock sets the agent's clock skew off the real clock (and the
// CA's); the agent reads it within 200 ms, a sliver of any fault that sets
// it, and the workloads' checks go on by the real clock, as peers' would.
func (w *world) setAgentClock(skew time.Duration) {
	w.t.Helper()
	if err := writeAtomic(w.clockFile, []byte(skew.String()), 0o644); err != nil {
		w.t.Fatal(err)
	}
}

// waitAllHold waits until every workload holds a certificate.
func (w *world) waitAllHold(within time.Duration) {
	w.t.Helper()
	deadline := time.Now().Add(within)
	for {
		missing := 0
		for _, wl := range w.workloads {
			if _, _, _, cur := wl.snapshot(); cur == nil {
				missing++
			}
		}
		if missing == 0 {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%d of %d workloads hold no certificate after %s; agent log:\n%s", missing, len(w.workloads), within, w.agent.log.tail(30))
		}
		time.Sleep(100 * time.Millisecond) // poll interval
	}
}

// leader is the replica holding the Lease, from the API server.
func (w *world) leader() *proc {
	w.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l, err := w.kube.Client.CoordinationV1().Leases("meshid-system").Get(context.Background(), "meshid-ca-leader", metav1.GetOptions{})
		if err == nil && l.Spec.HolderIdentity != nil {
			for _, c := range w.cas {
				if c.name == *l.Spec.HolderIdentity && c.PID() != 0 {
					return c
				}
			}
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("no live leader after 30s (%v)", err)
		}
		time.Sleep(200 * time.Millisecond) // poll interval
	}
}

// ledgerSerials is every serial the ledger holds.
func (w *world) ledgerSerials() map[string]bool {
	w.t.Helper()
	driver, dsn := "pgx", w.dsn
	if w.p.sqliteDir != "" {
		driver, dsn = "sqlite", filepath.Join(w.p.sqliteDir, "ledger.db")+"?_pragma=query_only(1)&_pragma=busy_timeout(10000)"
	}
	db, err := sql.Open(driver, dsn)
	if err != nil {
		w.t.Fatal(err)
	}
	defer db.Close()
	// A SQLite ledger commits into recent and moves records into
	// certificates in batches: both are the ledger.
	rows, err := db.Query("SELECT serial FROM certificates UNION ALL SELECT serial FROM recent")
	if err != nil {
		w.t.Fatal(err)
	}
	defer rows.Close()
	all := map[string]bool{}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			w.t.Fatal(err)
		}
		all[s] = true
	}
	return all
}

func waitReady(t *testing.T, p *proc, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !p.ready() {
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready after %s:\n%s", p.name, within, p.log.tail(30))
		}
		time.Sleep(100 * time.Millisecond) // poll interval
	}
}

// prober asks meshid-ca directly (through the balancer, not the agent) for
// a certificate every 250 ms with a valid token, and with a junk one, and
// keeps every answer's code: what a fault does to issuance, and how long
// recovery takes.
type prober struct {
	w      *world
	token  string
	client *agent.CAClient
	key    *ecdsa.PrivateKey
	id     spiffeid.ID

	mu      sync.Mutex
	answers []answer
	serials []string
}

type answer struct {
	at   time.Time
	junk bool
	code codes.Code
	msg  string
}

func newProber(t *testing.T, w *world, token string) *prober {
	t.Helper()
	conn, err := agent.DialCA(w.lb.Addr, w.roots, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &prober{w: w, token: token, client: agent.NewCAClient(conn, "Kubernetes"), key: key, id: spiffeid.RequireFromPath(td, "/ns/apps/sa/probe")}
}

func (p *prober) run(ctx context.Context) {
	csr, err := agent.NewCSR(p.key, p.id)
	if err != nil {
		panic(err)
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, junk := range []bool{false, true} {
			token := p.token
			if junk {
				token = "junk." + p.token[len(p.token)/2:]
			}
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			chain, err := p.client.Sign(rctx, csr, token, p.w.p.ttl)
			cancel()
			if ctx.Err() != nil {
				return
			}
			st := status.Convert(err)
			p.mu.Lock()
			p.answers = append(p.answers, answer{at: time.Now(), junk: junk, code: st.Code(), msg: st.Message()})
			if err == nil {
				p.serials = append(p.serials, fmt.Sprintf("%x", chain[0].SerialNumber))
			}
			p.mu.Unlock()
		}
	}
}

// since is every answer after t.
func (p *prober) since(t time.Time) []answer {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []answer
	for _, a := range p.answers {
		if a.at.After(t) {
			out = append(out, a)
		}
	}
	return out
}

// firstOK is when the first valid request after t was issued.
func (p *prober) firstOK(t time.Time) (time.Time, bool) {
	for _, a := range p.since(t) {
		if !a.junk && a.code == codes.OK {
			return a.at, true
		}
	}
	return time.Time{}, false
}

func shortSocket(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "faults")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "socket")
}
