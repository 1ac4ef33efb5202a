package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshid/meshid/internal/satoken"
)

// adminSA is the service account the demo's meshidctl authenticates as.
const adminSA = "meshid-system/meshidctl"

// audit is the demo's last part: meshidctl answers who holds which
// identity until when, cuts one off and lets it back.
func (m *mesh) audit(ctx context.Context, socket string, token func(string) string) error {
	tok, err := m.issuer.Token(satoken.Claims{Namespace: "meshid-system", ServiceAccount: "meshidctl", Audiences: []string{"istio-ca"}})
	if err != nil {
		return err
	}
	tokFile := filepath.Join(m.dir, "meshidctl.token")
	if err := os.WriteFile(tokFile, []byte(tok), 0o600); err != nil {
		return err
	}
	apiTokFile := filepath.Join(m.dir, "api.token")
	if err := os.WriteFile(apiTokFile, []byte(token("api")), 0o600); err != nil {
		return err
	}
	conn := []string{"--server=" + m.adminAddr, "--ca-file=" + m.rootFile, "--token-file=" + tokFile}
	ctl := func(args ...string) (string, error) {
		info("$ meshidctl %s", strings.Join(args, " "))
		cmd := exec.CommandContext(ctx, filepath.Join(m.binDir, "meshidctl"), append(args, conn...)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		for _, line := range strings.Split(strings.TrimRight(out.String(), "\n"), "\n") {
			info("  %s", line)
		}
		return out.String(), err
	}

	step("meshidctl: who holds which identity, until when (from meshid-ca's ledger)")
	if _, err := ctl("identities", "-n", "demo"); err != nil {
		return fmt.Errorf("meshidctl identities: %w", err)
	}
	if _, err := ctl("certs", "-n", "demo", "--spiffe-id", webID.String(), "--limit", "3"); err != nil {
		return fmt.Errorf("meshidctl certs: %w", err)
	}
	if _, err := ctl("check", "--agent-socket", socket, "--agent-token-file", apiTokFile); err != nil {
		return fmt.Errorf("meshidctl check: %w", err)
	}

	step("meshidctl deny: demo/web is cut off; its next renewal is refused")
	if _, err := ctl("deny", webID.String(), "--reason", "demo: suspected compromise"); err != nil {
		return fmt.Errorf("meshidctl deny: %w", err)
	}
	if err := m.waitRefusedRenewal(ctx); err != nil {
		return err
	}
	if _, err := ctl("allow", webID.String()); err != nil {
		return fmt.Errorf("meshidctl allow: %w", err)
	}
	return nil
}

// waitRefusedRenewal waits for the agent's log to show web's renewal
// refused by the CA.
func (m *mesh) waitRefusedRenewal(ctx context.Context) error {
	deadline := time.Now().Add(m.certTTL + 10*time.Second)
	for time.Now().Before(deadline) {
		log, _ := os.ReadFile(filepath.Join(m.dir, "meshid-agent.log"))
		for _, line := range strings.Split(string(log), "\n") {
			if strings.Contains(line, "certificate request failed") && strings.Contains(line, webID.String()) && strings.Contains(line, "PermissionDenied") {
				info("meshid-agent: renewal of %s refused: PermissionDenied (identity denied by an administrator)", webID)
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return errors.New("the agent's renewal of demo/web was not refused after the deny")
}

// wait keeps the demo's processes running until ctx ends (Ctrl-C), and
// shows how to ask them with meshidctl from another terminal.
func (m *mesh) wait(ctx context.Context, socket string) {
	rel := func(p string) string {
		if wd, err := os.Getwd(); err == nil {
			if r, err := filepath.Rel(wd, p); err == nil && !strings.HasPrefix(r, "..") {
				return r
			}
		}
		return p
	}
	ctl := rel(filepath.Join(m.binDir, "meshidctl"))
	conn := fmt.Sprintf("--server %s --ca-file %s --token-file %s", m.adminAddr, rel(m.rootFile), rel(filepath.Join(m.dir, "meshidctl.token")))
	step("meshid-ca and meshid-agent keep running (--stay); Ctrl-C stops them. From another terminal:")
	info("%s identities -n demo %s", ctl, conn)
	info("%s certs -n demo --limit 5 %s", ctl, conn)
	info("%s check --agent-socket %s --agent-token-file %s %s", ctl, rel(socket), rel(filepath.Join(m.dir, "api.token")), conn)
	info("%s secrets --socket %s --token-file %s", ctl, rel(socket), rel(filepath.Join(m.dir, "api.token")))
	info("%s inspect --bundle %s %s", ctl, rel(m.rootFile), rel(filepath.Join(m.dir, "web-cert-chain.pem")))
	info("the meshidctl and api tokens are valid for an hour (meshidctl authenticates as %s)", adminSA)
	<-ctx.Done()
}
