package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

func newRootRotationCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "root",
		Short: "Rotate meshid's root without an outage",
		Long: `A root rotation goes through four steps, each stored by meshid-ca and each
checked before it is taken:

  prepare     a new root and an intermediate under it are made; nothing trusts them yet
  distribute  the new root joins every trust bundle (ConfigMaps, agents, Workload API,
              the bundle endpoint); the old root still signs
  switch      the new intermediate signs; both roots stay trusted. Waits until every
              replica serves both roots, every namespace's ConfigMap holds them, kubelets
              had --root-propagation to refresh mounts, and no valid certificate predates
              the distribution
  retire      the old root leaves the bundles, once no valid certificate chains to it

A stopped meshidctl or a restarted meshid-ca loses nothing: run rotate again and it
goes on from the stored stage.`,
	}
	cmd.AddCommand(newRootStatusCommand(), newRootRotateCommand(), newRootAbortCommand())
	return cmd
}

// rotationRow is a rotation as meshidctl prints it.
type rotationRow struct {
	Stage         string      `json:"stage"`
	NextStep      string      `json:"next_step"`
	Ready         bool        `json:"ready"`
	Checks        []checkRow  `json:"checks"`
	SigningRoot   *caCertRow  `json:"signing_root,omitempty"`
	NextRoot      *caCertRow  `json:"next_root,omitempty"`
	OldRoots      []caCertRow `json:"old_roots,omitempty"`
	Roots         []caCertRow `json:"roots"`
	StartedAt     *time.Time  `json:"started_at,omitempty"`
	DistributedAt *time.Time  `json:"distributed_at,omitempty"`
	SwitchedAt    *time.Time  `json:"switched_at,omitempty"`
}

type checkRow struct {
	Name       string     `json:"name"`
	Passed     bool       `json:"passed"`
	Detail     string     `json:"detail"`
	ExpectedAt *time.Time `json:"expected_at,omitempty"`
}

type caCertRow struct {
	Fingerprint string    `json:"fingerprint_sha256"`
	Subject     string    `json:"subject"`
	NotAfter    time.Time `json:"not_after"`
}

func rotationFromPB(r *adminpb.RootRotation) rotationRow {
	row := rotationRow{Stage: r.GetStage(), NextStep: r.GetNextStep(), Ready: true, Checks: []checkRow{}, Roots: []caCertRow{}}
	ts := func(t interface{ AsTime() time.Time }, ok bool) *time.Time {
		if !ok {
			return nil
		}
		v := t.AsTime().UTC()
		return &v
	}
	row.StartedAt = ts(r.GetStartedAt(), r.GetStartedAt() != nil)
	row.DistributedAt = ts(r.GetDistributedAt(), r.GetDistributedAt() != nil)
	row.SwitchedAt = ts(r.GetSwitchedAt(), r.GetSwitchedAt() != nil)
	for _, c := range r.GetChecks() {
		row.Checks = append(row.Checks, checkRow{Name: c.GetName(), Passed: c.GetPassed(), Detail: c.GetDetail(),
			ExpectedAt: ts(c.GetExpectedAt(), c.GetExpectedAt() != nil)})
		row.Ready = row.Ready && c.GetPassed()
	}
	cert := func(c *adminpb.CACertificate) *caCertRow {
		if c == nil {
			return nil
		}
		return &caCertRow{Fingerprint: c.GetFingerprintSha256(), Subject: c.GetSubject(), NotAfter: c.GetNotAfter().AsTime().UTC()}
	}
	row.SigningRoot, row.NextRoot = cert(r.GetSigningRoot()), cert(r.GetNextRoot())
	for _, c := range r.GetRoots() {
		row.Roots = append(row.Roots, *cert(c))
	}
	for _, c := range r.GetOldRoots() {
		row.OldRoots = append(row.OldRoots, *cert(c))
	}
	return row
}

func shortFP(fp string) string { return fp[:min(len(fp), 16)] }

func rotationTable(w io.Writer, r rotationRow, now time.Time) error {
	fmt.Fprintf(w, "Stage:         %s\n", r.Stage)
	if r.StartedAt != nil {
		fmt.Fprintf(w, "Started:       %s\n", timestamp(*r.StartedAt))
	}
	if r.DistributedAt != nil {
		fmt.Fprintf(w, "Distributed:   %s\n", timestamp(*r.DistributedAt))
	}
	if r.SwitchedAt != nil {
		fmt.Fprintf(w, "Switched:      %s\n", timestamp(*r.SwitchedAt))
	}
	if r.SigningRoot != nil {
		fmt.Fprintf(w, "Signing root:  %s (expires in %s)\n", shortFP(r.SigningRoot.Fingerprint), timeLeft(r.SigningRoot.NotAfter, now))
	}
	if r.NextRoot != nil {
		fmt.Fprintf(w, "Next root:     %s (expires in %s)\n", shortFP(r.NextRoot.Fingerprint), timeLeft(r.NextRoot.NotAfter, now))
	}
	for _, o := range r.OldRoots {
		fmt.Fprintf(w, "Retiring root: %s\n", shortFP(o.Fingerprint))
	}
	fps := make([]string, len(r.Roots))
	for i, c := range r.Roots {
		fps[i] = shortFP(c.Fingerprint)
	}
	fmt.Fprintf(w, "Trusted roots: %s\n", strings.Join(fps, ", "))
	fmt.Fprintf(w, "Next step:     %s\n\n", r.NextStep)
	tw := newTable(w, "check", "result", "detail")
	for _, c := range r.Checks {
		result := "ok"
		if !c.Passed {
			result = "WAIT"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Name, result, c.Detail)
	}
	return tw.Flush()
}

func renderRotation(w io.Writer, format string, row rotationRow) error {
	return render(w, format, row, func(w io.Writer) error { return rotationTable(w, row, time.Now()) })
}

func newRootStatusCommand() *cobra.Command {
	var sf serverFlags
	cmd := &cobra.Command{
		Use:     "status",
		Short:   "Show where a root rotation stands and what its next step waits for",
		Example: `  meshidctl root status --ca-file root-cert.pem --token-file admin.token`,
		Args:    exactArgs(0, "none"),
	}
	output := outputFlag(cmd)
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		r, err := client.GetRootRotation(ctx, &adminpb.GetRootRotationRequest{})
		if err != nil {
			return callError(&sf, err)
		}
		return renderRotation(cmd.OutOrStdout(), *output, rotationFromPB(r))
	}
	return cmd
}

func newRootRotateCommand() *cobra.Command {
	var (
		sf          serverFlags
		wait        bool
		until       string
		force       bool
		poll        time.Duration
		waitTimeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Take the next step of a root rotation (or all of them, with --wait)",
		Long: `rotate takes the next step of the root rotation, starting one if none is under
way, provided every check of that step passes; otherwise it prints what the step
waits for and exits 1. With --wait it takes every step in turn, waiting for each
one's checks, until the old root is retired (or --until's stage is reached).

meshid-ca's certificate chains to the new root after the switch: give --ca-file
the bundle ConfigMap's root-cert.pem (it holds both roots during a rotation).
meshidctl also trusts the roots meshid-ca reports over the connection it has
already verified.`,
		Example: `  # One step at a time:
  meshidctl root rotate --ca-file root-cert.pem --token-file admin.token
  # All of it, waiting for each step's checks:
  meshidctl root rotate --wait --ca-file root-cert.pem --token-file admin.token
  # Distribute the new root now, switch later:
  meshidctl root rotate --wait --until distributed ...`,
		Args: exactArgs(0, "none"),
	}
	output := outputFlag(cmd)
	fs := cmd.Flags()
	fs.BoolVar(&wait, "wait", false, "take every step, waiting for each one's checks")
	fs.StringVar(&until, "until", "", "with --wait, stop once the rotation reaches this stage: prepared, distributed or switched")
	fs.BoolVar(&force, "force", false, "take the next step even if its checks fail (workloads may fail handshakes; logged by meshid-ca)")
	fs.DurationVar(&poll, "poll", 10*time.Second, "with --wait, how often to re-check")
	fs.DurationVar(&waitTimeout, "wait-timeout", 0, "with --wait, give up after this long (0: never; the rotation stays where it is and resumes on the next run)")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		switch until {
		case "", "prepared", "distributed", "switched":
		default:
			return usageErrorf("--until %q: want prepared, distributed or switched", until)
		}
		if until != "" && !wait {
			return usageErrorf("--until needs --wait")
		}
		if force && wait {
			return usageErrorf("--force takes one step; it does not go with --wait")
		}
		if poll <= 0 {
			return usageErrorf("--poll must be positive")
		}
		client, closeConn, err := sf.dial()
		if err != nil {
			return err
		}
		defer closeConn()
		ctx := cmd.Context()
		if waitTimeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, waitTimeout)
			defer cancel()
		}
		call := func(f func(ctx context.Context) (*adminpb.RootRotation, error)) (*adminpb.RootRotation, error) {
			c, cancel := context.WithTimeout(ctx, sf.timeout)
			defer cancel()
			return f(c)
		}
		getStatus := func(ctx context.Context) (*adminpb.RootRotation, error) {
			return client.GetRootRotation(ctx, &adminpb.GetRootRotationRequest{})
		}
		advance := func(from string) func(ctx context.Context) (*adminpb.RootRotation, error) {
			return func(ctx context.Context) (*adminpb.RootRotation, error) {
				return client.AdvanceRootRotation(ctx, &adminpb.AdvanceRootRotationRequest{FromStage: from, Force: force})
			}
		}
		out, errOut := cmd.OutOrStdout(), cmd.ErrOrStderr()
		started := false
		lastWait := ""
		for {
			cur, err := call(getStatus)
			if err != nil {
				return callError(&sf, err)
			}
			row := rotationFromPB(cur)
			if wait && (row.Stage == until || (started && row.Stage == "none")) {
				return renderRotation(out, *output, row)
			}
			if !row.Ready && !force {
				if !wait {
					rotationTable(errOut, row, time.Now())
					return fmt.Errorf("%s is not ready: its checks above are waiting (run again later, or with --wait)", row.NextStep)
				}
				var waiting []string
				for _, c := range row.Checks {
					if !c.Passed {
						waiting = append(waiting, c.Name+": "+c.Detail)
					}
				}
				if msg := strings.Join(waiting, "; "); msg != lastWait {
					fmt.Fprintf(errOut, "%s  waiting to %s: %s\n", time.Now().UTC().Format(time.TimeOnly), row.NextStep, msg)
					lastWait = msg
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("gave up waiting to %s (the rotation stays at %s; run rotate again to go on): %w", row.NextStep, row.Stage, ctx.Err())
				case <-time.After(poll):
				}
				continue
			}
			next, err := call(advance(row.Stage))
			switch status.Code(err) {
			case codes.OK:
			case codes.FailedPrecondition, codes.Aborted:
				if !wait {
					return fmt.Errorf("%s refused: %s", row.NextStep, status.Convert(err).Message())
				}
				// A check regressed or someone else moved the rotation:
				// read the status again.
				fmt.Fprintf(errOut, "%s  %s refused, re-checking: %s\n", time.Now().UTC().Format(time.TimeOnly), row.NextStep, status.Convert(err).Message())
				continue
			default:
				return callError(&sf, err)
			}
			started = true
			lastWait = ""
			// The step may have added a root meshid-ca's certificate will
			// move to: trust it over this verified connection.
			bctx, cancel := context.WithTimeout(ctx, sf.timeout)
			if _, roots, err := bundleRoots(bctx, &sf, client); err == nil {
				sf.trust(roots)
			}
			cancel()
			nrow := rotationFromPB(next)
			fmt.Fprintf(errOut, "%s  %s: done, stage %s\n", time.Now().UTC().Format(time.TimeOnly), row.NextStep, nrow.Stage)
			if !wait {
				return renderRotation(out, *output, nrow)
			}
		}
	}
	return cmd
}

func newRootAbortCommand() *cobra.Command {
	var sf serverFlags
	cmd := &cobra.Command{
		Use:   "abort",
		Short: "Drop a root rotation that has not switched yet: the new root leaves the bundles",
		Args:  exactArgs(0, "none"),
	}
	output := outputFlag(cmd)
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		cur, err := client.GetRootRotation(ctx, &adminpb.GetRootRotationRequest{})
		if err != nil {
			return callError(&sf, err)
		}
		r, err := client.AbortRootRotation(ctx, &adminpb.AbortRootRotationRequest{FromStage: cur.GetStage()})
		if status.Code(err) == codes.Aborted {
			return errors.New(status.Convert(err).Message())
		}
		if err != nil {
			return callError(&sf, err)
		}
		return renderRotation(cmd.OutOrStdout(), *output, rotationFromPB(r))
	}
	return cmd
}
