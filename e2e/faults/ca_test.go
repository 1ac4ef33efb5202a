package faults

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
)

// TestFaultsCAChanges breaks the CA's own changes: two replicas sharing the
// CA in a Secret, an intermediate that lives 90 s (renewed once a minute,
// the most often meshid-ca renews)
// and 30 s workload certificates, so that a renewal and a whole root
// rotation happen in the test's minutes. The leader is killed while the
// intermediate is renewed (its write stored, the answer lost), and during
// the root rotation, after the switch; the rotation is finished through the
// other replica.
func TestFaultsCAChanges(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kube-apiserver, PostgreSQL and meshid processes")
	}
	t.Parallel()
	w := newWorld(t, params{sdsWorkloads: 12, apiWorkloads: 4, ttl: 30 * time.Second, caChanges: true, intermediateTTL: 90 * time.Second})
	w.waitAllHold(60 * time.Second)
	w.adminToken = filepath.Join(w.dir, "admin.token")
	if err := os.WriteFile(w.adminToken, []byte(w.kube.Token(t, "ops", "admin", "istio-ca")), 0o600); err != nil {
		t.Fatal(err)
	}

	var results []*result
	for _, f := range []fault{killedDuringRenewal(), killedDuringRotation()} {
		results = append(results, w.run(f, f.hold))
		if t.Failed() {
			break
		}
	}
	report(t, w, results)
}

// killedDuringRenewal kills the leader while the intermediate is renewed:
// the renewed CA reaches the Secret, the answer is held back, and the
// replica that wrote it dies not knowing. Both replicas must end up
// signing with the one intermediate the Secret holds.
func killedDuringRenewal() fault {
	var before *x509.Certificate
	return fault{
		name: "leader meshid-ca killed while renewing the intermediate (its Secret write stored, the answer lost)",
		// The moment: a renewal's write has reached the API server, its
		// answer held back.
		prepare: func(w *world) {
			before = w.storedCA()
			held := w.front.HeldWrites.Load()
			w.front.HoldWrites("/secrets/meshid-ca", 4*time.Second)
			// Due at once (the backdating is longer than a third of 90 s),
			// so renewed once a minute.
			deadline := time.Now().Add(75 * time.Second)
			for w.front.HeldWrites.Load() == held {
				if time.Now().After(deadline) {
					w.t.Fatalf("no write of the CA Secret within 75 s")
				}
				time.Sleep(20 * time.Millisecond) // poll interval
			}
		},
		inject: func(w *world) func() {
			l := w.leader()
			l.Kill()
			return func() {
				w.front.HoldWrites("", 0)
				l.Restart(w.t)
			}
		},
		after: func(w *world, r *result) {
			stored := w.storedCA()
			if stored.Equal(before) {
				w.t.Errorf("the intermediate was not renewed")
				return
			}
			took := w.eachReplicaSignsUnder(func(chain []*x509.Certificate) error {
				if !chain[1].Equal(stored) {
					return fmt.Errorf("signed by %s, the Secret holds %s", ca.Fingerprint(chain[1]), ca.Fingerprint(stored))
				}
				return nil
			})
			r.note("one intermediate renewed; both replicas sign with it %s after the fault", took.Round(100*time.Millisecond))
		},
		hold: 6 * time.Second,
	}
}

// killedDuringRotation takes a root rotation through the leader up to the
// switch, kills the leader there (the replica that took the steps and
// writes the bundles), and finishes the rotation through the other one.
func killedDuringRotation() fault {
	var oldRoot *x509.Certificate
	var killed, other *proc
	return fault{
		name: "leader meshid-ca killed during a root rotation (after the switch); finished through the other replica",
		inject: func(w *world) func() {
			oldRoot = w.roots()[0]
			killed = w.leader()
			for _, c := range w.cas {
				if c != killed {
					other = c
				}
			}
			w.ctl(killed, "root", "rotate", "--wait", "--until=distributed", "--poll=200ms", "--wait-timeout=60s")
			// The switch waits out every certificate older than the
			// distribution (a lifetime); meanwhile nothing may lapse.
			go w.ctlMayFail(killed, "root", "rotate", "--wait", "--until=switched", "--poll=200ms", "--wait-timeout=90s")
			deadline := time.Now().Add(90 * time.Second)
			for w.stage(other) != "switched" {
				if time.Now().After(deadline) {
					w.t.Fatalf("the rotation did not switch within 90 s")
				}
				time.Sleep(200 * time.Millisecond) // poll interval
			}
			killed.Kill()
			return func() { killed.Restart(w.t) }
		},
		after: func(w *world, r *result) {
			w.ctl(other, "root", "rotate", "--wait", "--poll=200ms", "--wait-timeout=120s")
			if st := w.stage(other); st != "none" {
				w.t.Errorf("after rotate --wait: stage %q, want none", st)
			}
			// The bundle holds the new root alone, as the workloads' trust.
			deadline := time.Now().Add(30 * time.Second)
			for {
				roots := w.roots()
				if len(roots) == 1 && !roots[0].Equal(oldRoot) {
					break
				}
				if time.Now().After(deadline) {
					w.t.Errorf("the bundle holds %d roots 30 s after the retire, want the new one alone", len(roots))
					return
				}
				time.Sleep(200 * time.Millisecond) // poll interval
			}
			newRoot := w.roots()[0]
			pool := x509.NewCertPool()
			pool.AddCert(newRoot)
			took := w.eachReplicaSignsUnder(func(chain []*x509.Certificate) error {
				if !chain[len(chain)-1].Equal(newRoot) {
					return fmt.Errorf("chain ends in %s, not the new root", ca.Fingerprint(chain[len(chain)-1]))
				}
				return nil
			})
			onNew := 0
			for _, wl := range w.workloads {
				if chain := wl.currentChain(); chain != nil && verifyChain(chain, pool) == nil {
					onNew++
				}
			}
			if onNew != len(w.workloads) {
				w.t.Errorf("%d of %d workloads hold a certificate under the new root after the rotation", onNew, len(w.workloads))
			}
			r.note("rotation finished through %s; both replicas sign under the new root %s after; %d of %d workloads moved, none lapsed", other.name, took.Round(100*time.Millisecond), onNew, len(w.workloads))
		},
		hold: 5 * time.Second,
	}
}

// storedCA is the signing intermediate the CA Secret holds.
func (w *world) storedCA() *x509.Certificate {
	w.t.Helper()
	sec, err := w.kube.Client.CoreV1().Secrets("meshid-system").Get(context.Background(), "meshid-ca", metav1.GetOptions{})
	if err != nil {
		w.t.Fatal(err)
	}
	certs, err := ca.ParseCertificatesPEM(sec.Data[keys.CACertFile])
	if err != nil || len(certs) == 0 {
		w.t.Fatalf("the CA Secret's %s: %v", keys.CACertFile, err)
	}
	return certs[0]
}

// signAt asks replica c itself for the probe's certificate.
func (w *world) signAt(c *proc) ([]*x509.Certificate, error) {
	addr := c.Addr()
	if addr == "" {
		return nil, fmt.Errorf("%s is down", c.name)
	}
	conn, err := agent.DialCA(addr, w.roots, "localhost")
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	csr, err := agent.NewCSR(w.probe.key, w.probe.id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	chain, err := agent.NewCAClient(conn, "Kubernetes").Sign(ctx, csr, w.probe.token, w.p.ttl)
	if err == nil {
		// Held by a client: the ledger check counts it too.
		w.probe.mu.Lock()
		w.probe.serials = append(w.probe.serials, fmt.Sprintf("%x", chain[0].SerialNumber))
		w.probe.mu.Unlock()
	}
	return chain, err
}

// eachReplicaSignsUnder waits until every replica's certificate passes
// check, and says how long that took.
func (w *world) eachReplicaSignsUnder(check func([]*x509.Certificate) error) time.Duration {
	w.t.Helper()
	start := time.Now()
	deadline := start.Add(30 * time.Second)
	for {
		var failed error
		for _, c := range w.cas {
			chain, err := w.signAt(c)
			if err == nil {
				err = check(chain)
			}
			if err != nil {
				failed = fmt.Errorf("%s: %w", c.name, err)
				break
			}
		}
		if failed == nil {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			w.t.Errorf("30 s after the fault: %v", failed)
			return -1
		}
		time.Sleep(250 * time.Millisecond) // poll interval
	}
}

// ctl runs meshidctl against replica c's admin API, as an operator would,
// and fails the test if it fails.
func (w *world) ctl(c *proc, args ...string) string {
	w.t.Helper()
	out, err := w.ctlMayFail(c, args...)
	if err != nil {
		w.t.Fatalf("meshidctl %v: %v", args, err)
	}
	return out
}

func (w *world) ctlMayFail(c *proc, args ...string) (string, error) {
	args = append(args, "--server="+c.Admin(), "--server-name=localhost", "--ca-file="+w.rootFile, "--token-file="+w.adminToken)
	cmd := exec.Command(filepath.Join(binDir, "meshidctl"), args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%w: %s%s", err, out.String(), errOut.String())
	}
	return out.String(), nil
}

// stage is the root rotation's stage as replica c reports it ("" when it
// cannot say).
func (w *world) stage(c *proc) string {
	out, err := w.ctlMayFail(c, "root", "status", "-o", "json")
	if err != nil {
		return ""
	}
	var st struct {
		Stage string `json:"stage"`
	}
	if json.Unmarshal([]byte(out), &st) != nil {
		return ""
	}
	return st.Stage
}
