package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDemo runs the README's first command's program twice on one directory:
// it must issue, verify and refuse as it says, and reuse its root.
func TestDemo(t *testing.T) {
	dir := t.TempDir()
	run := func() string {
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		defer cancel()
		// A relative --dir, as the README's command uses (.meshid-demo).
		cmd := exec.CommandContext(ctx, filepath.Join(binDir, "meshid-demo"), "--dir", ".meshid-demo",
			fmt.Sprintf("--grpc-addr=127.0.0.1:%d", freeTCPPort(t)),
			fmt.Sprintf("--http-addr=127.0.0.1:%d", freeTCPPort(t)),
			fmt.Sprintf("--admin-addr=127.0.0.1:%d", freeTCPPort(t)),
			// Certificates of 4 s rotate every 2 s or so: two rotations
			// each in 6 s, and 2 s of slack for a renewal on a loaded
			// machine (with 2 s ones an agent starved for a second
			// served a lapsed certificate).
			"--cert-ttl=4s", "--duration=6s")
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("meshid-demo: %v\n%s", err, out)
		}
		return string(out)
	}
	first := run()
	for _, want := range []string{
		"verified by go-spiffe's x509svid.Verify: spiffe://cluster.local/ns/demo/sa/web",
		"refused: PermissionDenied",
		"refused: Unauthenticated",
		"24h0m0s from now",
		"web → api: mTLS up",
		"web rotated",
		"api rotated",
		"refused: remote error: tls: certificate required",
		"refused: remote error: tls: bad certificate",
		"$ meshidctl identities -n demo",
		"spiffe://cluster.local/ns/demo/sa/api",
		"Status check results are √",
		"denied by system:serviceaccount:meshid-system:meshidctl",
		"renewal of spiffe://cluster.local/ns/demo/sa/web refused: PermissionDenied",
		"allowed again",
		"stopping meshid-agent",
		"stopping meshid-ca",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("demo output lacks %q:\n%s", want, first)
		}
	}
	if strings.Contains(first, "UNEXPECTED") {
		t.Errorf("demo reports an unexpected result:\n%s", first)
	}
	rootLine := func(out string) string {
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "SHA-256") {
				return l[strings.Index(l, "root "):]
			}
		}
		t.Fatalf("no root line in:\n%s", out)
		return ""
	}
	if a, b := rootLine(first), rootLine(run()); a != b {
		t.Errorf("second run has another root: %q, then %q", a, b)
	}
}
