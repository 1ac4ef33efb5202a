package faults

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestFaultsSQLite: one meshid-ca on a SQLite ledger in a small filesystem
// of its own (a 16 MiB tmpfs), as a single-replica install keeps it on a
// small volume. The disk fills while workloads rotate: nothing may be
// returned that was not recorded, refusals say why, and issuance resumes
// once there is room; then the CA is killed and restarted on its file.
func TestFaultsSQLite(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kube-apiserver and meshid processes")
	}
	if os.Geteuid() != 0 {
		t.Skip("mounting the ledger's small filesystem needs root (hack/test.sh runs as root for the cluster test)")
	}
	t.Parallel()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m", "meshid-faults", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })

	// Short certificates, so that renewals fall into each fault.
	const ttl = 24 * time.Second
	hold := 6 * time.Second
	w := newWorld(t, params{sdsWorkloads: 12, apiWorkloads: 4, ttl: ttl, sqliteDir: dir})
	w.waitAllHold(60 * time.Second)

	filler := filepath.Join(dir, "filler")
	results := []*result{
		w.run(fault{
			name: "the SQLite ledger's disk full",
			inject: func(w *world) func() {
				// dd stops at ENOSPC: the filesystem is full.
				exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M").Run()
				return func() { os.Remove(filler) }
			},
			refusable: true,
		}, hold),
		w.run(fault{
			name: "meshid-ca on SQLite killed (SIGKILL), restarted",
			inject: func(w *world) func() {
				w.cas[0].Kill()
				return func() { w.cas[0].Restart(w.t) }
			},
			refusable: true,
		}, hold),
	}
	report(t, w, results)
}
