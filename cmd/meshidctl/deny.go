package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

func newDenyCommand() *cobra.Command {
	var (
		sf     serverFlags
		reason string
	)
	cmd := &cobra.Command{
		Use:   "deny SPIFFE_ID --reason TEXT",
		Short: "Cut an identity off: meshid-ca issues and renews nothing more for it",
		Long: `deny records, with who you are and when, that meshid-ca must issue no more
certificates to an identity. Certificates already issued stay valid until they
expire (at most --max-cert-ttl); agents' renewals are refused from now on.`,
		Example: `  meshidctl deny spiffe://cluster.local/ns/shop/sa/web --reason "INC-4711: leaked token"`,
		Args:    exactArgs(1, "the SPIFFE ID to deny"),
	}
	output := outputFlag(cmd)
	cmd.Flags().StringVar(&reason, "reason", "", "why (required; recorded)")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if strings.TrimSpace(reason) == "" {
			return usageErrorf("--reason is required: say why, it is recorded with the denial")
		}
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		d, err := client.DenyIdentity(ctx, &adminpb.DenyIdentityRequest{SpiffeId: args[0], Reason: reason})
		if err != nil {
			return callError(&sf, err)
		}
		row := denialFromPB(d)
		return render(cmd.OutOrStdout(), *output, row, func(w io.Writer) error {
			_, err := fmt.Fprintf(w, "%s denied by %s at %s: %s\n", row.SPIFFEID, row.DeniedBy, row.DeniedAt.Format("2006-01-02T15:04:05Z"), row.Reason)
			return err
		})
	}
	return cmd
}

func newAllowCommand() *cobra.Command {
	var sf serverFlags
	cmd := &cobra.Command{
		Use:     "allow SPIFFE_ID",
		Short:   "Let a denied identity get certificates again",
		Example: `  meshidctl allow spiffe://cluster.local/ns/shop/sa/web`,
		Args:    exactArgs(1, "the SPIFFE ID to allow"),
	}
	output := outputFlag(cmd)
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		resp, err := client.AllowIdentity(ctx, &adminpb.AllowIdentityRequest{SpiffeId: args[0]})
		if err != nil {
			return callError(&sf, err)
		}
		out := struct {
			SPIFFEID  string `json:"spiffe_id"`
			WasDenied bool   `json:"was_denied"`
		}{args[0], resp.GetWasDenied()}
		return render(cmd.OutOrStdout(), *output, out, func(w io.Writer) error {
			msg := "allowed again"
			if !out.WasDenied {
				msg = "was not denied; nothing changed"
			}
			_, err := fmt.Fprintf(w, "%s %s\n", out.SPIFFEID, msg)
			return err
		})
	}
	return cmd
}

// exactArgs is cobra.ExactArgs with a usage error that says what is missing.
func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("want %d argument (%s), got %d", n, what, len(args))
		}
		return nil
	}
}
