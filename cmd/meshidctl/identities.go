package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

// identityRow is one identity as meshidctl shows it.
type identityRow struct {
	SPIFFEID          string     `json:"spiffe_id"`
	Namespace         string     `json:"namespace"`
	ServiceAccount    string     `json:"service_account"`
	ValidCertificates int        `json:"valid_certificates"`
	LastIssued        *time.Time `json:"last_issued,omitempty"`
	SoonestExpiry     *time.Time `json:"soonest_expiry,omitempty"`
	Denied            bool       `json:"denied"`
	Denial            *denialRow `json:"denial,omitempty"`
}

type denialRow struct {
	SPIFFEID string    `json:"spiffe_id"`
	Reason   string    `json:"reason"`
	DeniedBy string    `json:"denied_by"`
	DeniedAt time.Time `json:"denied_at"`
}

func timePtr(ts *timestamppb.Timestamp) *time.Time {
	if ts == nil {
		return nil
	}
	t := ts.AsTime().UTC()
	return &t
}

func denialFromPB(d *adminpb.Denial) *denialRow {
	if d == nil {
		return nil
	}
	return &denialRow{SPIFFEID: d.GetSpiffeId(), Reason: d.GetReason(), DeniedBy: d.GetDeniedBy(), DeniedAt: d.GetDeniedAt().AsTime().UTC()}
}

func newIdentitiesCommand() *cobra.Command {
	var (
		sf        serverFlags
		namespace string
	)
	cmd := &cobra.Command{
		Use:   "identities",
		Short: "One row per SPIFFE ID: certificates still valid, last issued, soonest expiry, denied or not",
		Example: `  meshidctl identities --ca-file root-cert.pem --token-file admin.token
  meshidctl identities -n shop -o json`,
		Args: cobra.NoArgs,
	}
	output := outputFlag(cmd)
	cmd.Flags().StringVarP(&namespace, "namespace", "n", "", "only this namespace")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		resp, err := client.ListIdentities(ctx, &adminpb.ListIdentitiesRequest{Namespace: namespace})
		if err != nil {
			return callError(&sf, err)
		}
		rows := []identityRow{}
		for _, id := range resp.GetIdentities() {
			rows = append(rows, identityRow{
				SPIFFEID: id.GetSpiffeId(), Namespace: id.GetNamespace(), ServiceAccount: id.GetServiceAccount(),
				ValidCertificates: int(id.GetValidCertificates()),
				LastIssued:        timePtr(id.GetLastIssued()), SoonestExpiry: timePtr(id.GetSoonestExpiry()),
				Denied: id.GetDenial() != nil, Denial: denialFromPB(id.GetDenial()),
			})
		}
		return render(cmd.OutOrStdout(), *output, rows, func(w io.Writer) error {
			return identitiesTable(w, rows, time.Now())
		})
	}
	return cmd
}

func identitiesTable(w io.Writer, rows []identityRow, now time.Time) error {
	t := newTable(w, "SPIFFE ID", "VALID CERTS", "LAST ISSUED", "SOONEST EXPIRY", "DENIED")
	for _, r := range rows {
		last, soonest, denied := "-", "-", "no"
		if r.LastIssued != nil {
			last = humanDuration(now.Sub(*r.LastIssued)) + " ago"
		}
		if r.SoonestExpiry != nil {
			soonest = timeLeft(*r.SoonestExpiry, now)
		}
		if r.Denial != nil {
			denied = fmt.Sprintf("yes: %s (by %s, %s ago)", r.Denial.Reason, r.Denial.DeniedBy, humanDuration(now.Sub(r.Denial.DeniedAt)))
		}
		fmt.Fprintf(t, "%s\t%d\t%s\t%s\t%s\n", r.SPIFFEID, r.ValidCertificates, last, soonest, denied)
	}
	return t.Flush()
}
