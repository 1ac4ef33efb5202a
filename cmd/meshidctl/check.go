package main

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

// Check results.
const (
	checkOK   = "ok"
	checkWarn = "warning"
	checkFail = "failed"
)

type checkResult struct {
	Group   string `json:"group"`
	Name    string `json:"name"`
	Result  string `json:"result"`
	Message string `json:"message"`
}

type checkReport struct {
	Checks   []checkResult `json:"checks"`
	Warnings int           `json:"warnings"`
	Failures int           `json:"failures"`
}

func (r *checkReport) add(group, name, result, format string, args ...any) {
	r.Checks = append(r.Checks, checkResult{Group: group, Name: name, Result: result, Message: fmt.Sprintf(format, args...)})
	switch result {
	case checkWarn:
		r.Warnings++
	case checkFail:
		r.Failures++
	}
}

func newCheckCommand() *cobra.Command {
	var (
		sf             serverFlags
		warnWithin     time.Duration
		agentSocket    string
		agentTokenFile string
	)
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Health report: CA reachable and ready, CA certificates' time left, ledger, and an agent's certificate",
		Long: `check runs every check and prints one line each, like linkerd check. It exits 1
if any check failed; warnings (a CA certificate lapsing within --warn-within)
do not change the exit code.`,
		Example: `  meshidctl check --ca-file root-cert.pem --token-file admin.token
  meshidctl check --agent-socket ./var/run/secrets/workload-spiffe-uds/socket --agent-token-file token`,
		Args: cobra.NoArgs,
	}
	output := outputFlag(cmd)
	cmd.Flags().DurationVar(&warnWithin, "warn-within", 30*24*time.Hour, "warn when a CA certificate lapses within this")
	cmd.Flags().StringVar(&agentSocket, "agent-socket", "", "also check that the meshid-agent on this socket serves a certificate that verifies against the CA's bundle")
	cmd.Flags().StringVar(&agentTokenFile, "agent-token-file", "", "with --agent-socket in node mode: a proxy's token, to ask for its certificate")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if warnWithin <= 0 {
			return usageErrorf("--warn-within must be positive")
		}
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		now := time.Now()
		var r checkReport
		roots := checkCA(ctx, &r, &sf, client, now, warnWithin)
		checkFederation(ctx, &r, client, now)
		if agentSocket != "" {
			checkAgent(ctx, &r, agentSocket, agentTokenFile, roots, now, sf.timeout)
		}
		if err := render(cmd.OutOrStdout(), *output, r, func(w io.Writer) error { return checkTable(w, r) }); err != nil {
			return err
		}
		if r.Failures > 0 {
			return &exitError{code: exitFailed, err: fmt.Errorf("%d check(s) failed", r.Failures)}
		}
		return nil
	}
	return cmd
}

// checkCA checks meshid-ca and returns its roots (nil if unknown).
func checkCA(ctx context.Context, r *checkReport, sf *serverFlags, client adminpb.AdminClient, now time.Time, warnWithin time.Duration) []*x509.Certificate {
	const g = "meshid-ca"
	st, err := client.GetStatus(ctx, &adminpb.GetStatusRequest{})
	if err != nil {
		r.add(g, "reachable", checkFail, "%v", callError(sf, err))
		return nil
	}
	r.add(g, "reachable", checkOK, "admin API answers at %s", sf.server)
	if st.GetReady() {
		r.add(g, "ready", checkOK, "CA keys loaded (source: %s), trust domain %s", st.GetCaSource(), st.GetTrustDomain())
	} else {
		r.add(g, "ready", checkFail, "CA not ready")
	}
	lifetime := func(name string, c *adminpb.CACertificate, warn time.Duration) {
		if c == nil {
			r.add(g, name, checkFail, "no %s certificate", name)
			return
		}
		left := c.GetNotAfter().AsTime().Sub(now)
		switch {
		case left <= 0:
			r.add(g, name, checkFail, "%s certificate expired %s ago", name, humanDuration(-left))
		case left < warn:
			r.add(g, name, checkWarn, "%s certificate expires in %s (%s), within %s", name, humanDuration(left), c.GetNotAfter().AsTime().UTC().Format(time.RFC3339), humanDuration(warn))
		default:
			r.add(g, name, checkOK, "%s certificate valid for %s (until %s)", name, humanDuration(left), c.GetNotAfter().AsTime().UTC().Format(time.RFC3339))
		}
	}
	// A root takes planning to replace (meshidctl root rotate): warn half a
	// year ahead, as deploy/prometheus/alerts.yaml does.
	lifetime("root", st.GetRoot(), max(warnWithin, rootWarnWithin))
	lifetime("intermediate", st.GetIntermediate(), warnWithin)
	checkRenewal(r, st, now)
	// The serving certificate lives a day and is renewed at half life: it
	// is late only when under a quarter of that is left.
	lifetime("serving", st.GetServing(), 6*time.Hour)
	if l := st.GetLedger(); l.GetReachable() {
		r.add(g, "ledger", checkOK, "%s ledger reachable", l.GetDriver())
	} else {
		r.add(g, "ledger", checkFail, "%s ledger: %s", l.GetDriver(), l.GetError())
	}
	_, roots, err := bundleRoots(ctx, sf, client)
	if err != nil {
		r.add(g, "bundle", checkFail, "%v", err)
		return nil
	}
	r.add(g, "bundle", checkOK, "%d root(s) trusted", len(roots))
	checkRotation(ctx, r, client)
	return roots
}

const rootWarnWithin = 180 * 24 * time.Hour

// checkRotation reports a root rotation under way: not a fault, but
// something to finish.
func checkRotation(ctx context.Context, r *checkReport, client adminpb.AdminClient) {
	rot, err := client.GetRootRotation(ctx, &adminpb.GetRootRotationRequest{})
	switch {
	case status.Code(err) == codes.FailedPrecondition:
		return // a plug-in CA: rotated by replacing files
	case err != nil:
		r.add("meshid-ca", "root rotation", checkWarn, "cannot read: %v", status.Convert(err).Message())
		return
	case rot.GetStage() == "none":
		r.add("meshid-ca", "root rotation", checkOK, "no root rotation under way")
		return
	}
	var waiting []string
	for _, c := range rot.GetChecks() {
		if !c.GetPassed() {
			waiting = append(waiting, c.GetName())
		}
	}
	next := "ready"
	if len(waiting) > 0 {
		next = "waits for " + strings.Join(waiting, ", ")
	}
	r.add("meshid-ca", "root rotation", checkWarn, "under way at stage %s; %s %s (meshidctl root status)", rot.GetStage(), rot.GetNextStep(), next)
}

// checkFederation reports each federated trust domain: a stale bundle (no
// good fetch for 3 refresh intervals) is a warning, since it is still
// trusted but may lack the peer's new keys; none held at all fails, since
// the peer's workloads are then refused.
func checkFederation(ctx context.Context, r *checkReport, client adminpb.AdminClient, now time.Time) {
	resp, err := client.ListFederatedBundles(ctx, &adminpb.ListFederatedBundlesRequest{})
	if err != nil {
		r.add("federation", "federated bundles", checkWarn, "cannot read: %v", status.Convert(err).Message())
		return
	}
	checkFederationBundles(r, resp.GetBundles(), now)
}

func checkFederationBundles(r *checkReport, bundles []*adminpb.FederatedBundle, now time.Time) {
	for _, b := range bundles {
		name := b.GetTrustDomain()
		fetched := "never fetched since meshid-ca started"
		if t := b.GetFetchedAt(); t != nil {
			fetched = "last fetched " + humanDuration(now.Sub(t.AsTime())) + " ago"
		}
		why := ""
		if e := b.GetLastError(); e != "" {
			why = "; last error: " + e
		}
		switch {
		case len(b.GetBundle()) == 0:
			r.add("federation", name, checkFail, "%s: no bundle held, its workloads are refused; %s%s", name, fetched, why)
		case b.GetStale():
			r.add("federation", name, checkWarn, "%s: bundle stale (still trusted, from %s): %s, refresh every %s%s", name, b.GetSource(), fetched, humanDuration(b.GetRefresh().AsDuration()), why)
		default:
			r.add("federation", name, checkOK, "%s: bundle fresh, %s, %d X.509 and %d JWT keys", name, fetched, b.GetX509Authorities(), b.GetJwtAuthorities())
		}
	}
}

// checkAgent asks the agent for its workload certificate over SDS and
// verifies it against roots.
func checkAgent(ctx context.Context, r *checkReport, socket, tokenFile string, roots []*x509.Certificate, now time.Time, timeout time.Duration) {
	const g = "meshid-agent"
	abs, err := filepath.Abs(socket)
	if err != nil {
		r.add(g, "socket", checkFail, "%v", err)
		return
	}
	token := ""
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			r.add(g, "socket", checkFail, "--agent-token-file: %v", err)
			return
		}
		token = strings.TrimSpace(string(b))
	}
	served, err := fetchSecrets(ctx, abs, token, []string{"default"}, timeout)
	if err != nil || len(served) != 1 || len(served[0].certs) == 0 {
		r.add(g, "serves", checkFail, "asking %s for its certificate: %v", socket, err)
		return
	}
	r.add(g, "serves", checkOK, "%s answers over SDS", socket)
	chain := served[0].certs
	leaf := chain[0]
	id := "-"
	if len(leaf.URIs) == 1 {
		id = leaf.URIs[0].String()
	}
	if served[0].keyErr != "" {
		r.add(g, "certificate", checkFail, "%s: the key served does not match the certificate: %s", id, served[0].keyErr)
		return
	}
	if roots == nil {
		r.add(g, "certificate", checkFail, "%s: cannot verify without the CA's bundle", id)
		return
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range roots {
		pool.AddCert(c)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		r.add(g, "certificate", checkFail, "%s does not verify against the CA's bundle: %v", id, err)
		return
	}
	r.add(g, "certificate", checkOK, "%s verifies against the CA's bundle, valid for %s", id, humanDuration(leaf.NotAfter.Sub(now)))
}

func checkTable(w io.Writer, r checkReport) error {
	group := ""
	for _, c := range r.Checks {
		if c.Group != group {
			if group != "" {
				fmt.Fprintln(w)
			}
			group = c.Group
			fmt.Fprintf(w, "%s\n%s\n", group, strings.Repeat("-", len(group)))
		}
		mark := map[string]string{checkOK: "√", checkWarn: "‼", checkFail: "×"}[c.Result]
		fmt.Fprintf(w, "%s %s\n", mark, c.Message)
	}
	fmt.Fprintln(w)
	switch {
	case r.Failures > 0:
		fmt.Fprintf(w, "Status check results are ×: %d failed, %d warning(s)\n", r.Failures, r.Warnings)
	case r.Warnings > 0:
		fmt.Fprintf(w, "Status check results are ‼: %d warning(s)\n", r.Warnings)
	default:
		fmt.Fprintln(w, "Status check results are √")
	}
	return nil
}

// checkRenewal reports the intermediate's renewal: failing is a warning,
// overdue by half of what was left at its due time a failure (as the alert
// MeshidIntermediateRenewalOverdue).
func checkRenewal(r *checkReport, st *adminpb.Status, now time.Time) {
	const g, name = "meshid-ca", "intermediate renewal"
	due := st.GetIntermediateRenewalDue()
	if due == nil {
		return // a plug-in CA: renewed by replacing its files
	}
	at, failing := due.AsTime(), st.GetIntermediateRenewalError()
	end := st.GetIntermediate().GetNotAfter().AsTime()
	switch {
	case now.Before(at) && failing == "":
		r.add(g, name, checkOK, "due in %s (%s)", humanDuration(at.Sub(now)), at.UTC().Format(time.RFC3339))
	case now.Before(at):
		r.add(g, name, checkWarn, "the last attempt failed (%s); due in %s", failing, humanDuration(at.Sub(now)))
	case now.Sub(at) > end.Sub(at)/2:
		r.add(g, name, checkFail, "overdue by %s, the intermediate lapses in %s: %s", humanDuration(now.Sub(at)), humanDuration(end.Sub(now)), orUnknown(failing))
	default:
		r.add(g, name, checkWarn, "due %s ago, not done yet: %s", humanDuration(now.Sub(at)), orUnknown(failing))
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "no attempt has failed yet (see meshid-ca's log)"
	}
	return s
}
