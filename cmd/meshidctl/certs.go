package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

// certRow is one issued certificate as the ledger recorded it.
type certRow struct {
	Serial            string    `json:"serial"`
	SPIFFEID          string    `json:"spiffe_id"`
	Namespace         string    `json:"namespace"`
	ServiceAccount    string    `json:"service_account"`
	PodName           string    `json:"pod_name,omitempty"`
	PodUID            string    `json:"pod_uid,omitempty"`
	ClusterID         string    `json:"cluster_id,omitempty"`
	PublicKeySHA256   string    `json:"public_key_sha256"`
	NotBefore         time.Time `json:"not_before"`
	NotAfter          time.Time `json:"not_after"`
	IssuerFingerprint string    `json:"issuer_fingerprint"`
	AuthMethod        string    `json:"auth_method"`
	IssuedAt          time.Time `json:"issued_at"`
	RequestedBy       string    `json:"requested_by,omitempty"`
}

func certFromPB(c *adminpb.Certificate) certRow {
	return certRow{
		Serial: c.GetSerial(), SPIFFEID: c.GetSpiffeId(), Namespace: c.GetNamespace(), ServiceAccount: c.GetServiceAccount(),
		PodName: c.GetPodName(), PodUID: c.GetPodUid(), ClusterID: c.GetClusterId(), PublicKeySHA256: c.GetPublicKeySha256(),
		NotBefore: c.GetNotBefore().AsTime().UTC(), NotAfter: c.GetNotAfter().AsTime().UTC(),
		IssuerFingerprint: c.GetIssuerFingerprint(), AuthMethod: c.GetAuthMethod(), IssuedAt: c.GetIssuedAt().AsTime().UTC(),
		RequestedBy: c.GetRequestedBy(),
	}
}

func newCertsCommand() *cobra.Command {
	var (
		sf             serverFlags
		req            adminpb.ListCertificatesRequest
		issuedSince    string
		expiringWithin time.Duration
		limit          int
		all            bool
	)
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Certificates meshid-ca issued, newest first, from its ledger",
		Example: `  # what is about to lapse
  meshidctl certs --expiring-within 1h --ca-file root-cert.pem --token-file admin.token
  # everything a pod was given, and one certificate by serial
  meshidctl certs -n shop --pod web-7d4b9
  meshidctl certs --serial 425c1a0f...`,
		Args: cobra.NoArgs,
	}
	output := outputFlag(cmd)
	fs := cmd.Flags()
	fs.StringVar(&req.SpiffeId, "spiffe-id", "", "only this identity")
	fs.StringVarP(&req.Namespace, "namespace", "n", "", "only this namespace")
	fs.StringVar(&req.PodName, "pod", "", "only certificates issued to this pod")
	fs.StringVar(&req.Serial, "serial", "", "one certificate by serial (hex); exit 3 if the ledger has none")
	fs.StringVar(&issuedSince, "issued-since", "", "only certificates issued since this time (RFC 3339) or this long ago (e.g. 2h)")
	fs.DurationVar(&expiringWithin, "expiring-within", 0, "only certificates still valid that lapse within this duration (e.g. 1h)")
	fs.BoolVar(&req.ValidOnly, "valid", false, "only certificates valid now")
	fs.IntVar(&limit, "limit", 100, "most rows shown (1-1000); with --all, the page size")
	fs.BoolVar(&all, "all", false, "every matching certificate, page after page")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if limit < 1 || limit > 1000 {
			return usageErrorf("--limit must be between 1 and 1000")
		}
		if expiringWithin < 0 {
			return usageErrorf("--expiring-within must be positive")
		}
		now := time.Now()
		if issuedSince != "" {
			since, err := parseSince(issuedSince, now)
			if err != nil {
				return err
			}
			req.IssuedSince = timestamppb.New(since)
		}
		if expiringWithin > 0 {
			req.ExpiringWithin = durationpb.New(expiringWithin)
		}
		req.PageSize = int32(limit)
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		rows := []certRow{}
		if req.Serial != "" {
			c, err := client.GetCertificate(ctx, &adminpb.GetCertificateRequest{Serial: req.Serial})
			if err != nil {
				return callError(&sf, err)
			}
			rows = append(rows, certFromPB(c))
		} else {
			for {
				resp, err := client.ListCertificates(ctx, &req)
				if err != nil {
					return callError(&sf, err)
				}
				for _, c := range resp.GetCertificates() {
					rows = append(rows, certFromPB(c))
				}
				if !all || resp.GetNextPageToken() == "" {
					break
				}
				req.PageToken = resp.GetNextPageToken()
			}
		}
		return render(cmd.OutOrStdout(), *output, rows, func(w io.Writer) error {
			return certsTable(w, rows, now)
		})
	}
	return cmd
}

// parseSince reads an RFC 3339 time or a duration before now.
func parseSince(s string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, usageErrorf("--issued-since %s: a duration must be positive", s)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, usageErrorf("--issued-since %q: want an RFC 3339 time (2026-11-23T10:00:00Z) or a duration (2h)", s)
	}
	return t, nil
}

func certsTable(w io.Writer, rows []certRow, now time.Time) error {
	t := newTable(w, "SERIAL", "SPIFFE ID", "POD", "REQUESTED BY", "ISSUED", "EXPIRES", "AUTH")
	for _, r := range rows {
		pod, by := "-", "-"
		if r.PodName != "" {
			pod = r.PodName
		}
		if r.RequestedBy != "" {
			// A node proxy's pod, in the node proxy's namespace.
			by = requesterName(r.RequestedBy)
			pod = strings.SplitN(by, "/", 2)[0] + "/" + pod
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Serial, r.SPIFFEID, pod, by,
			humanDuration(now.Sub(r.IssuedAt))+" ago", timeLeft(r.NotAfter, now), r.AuthMethod)
	}
	return t.Flush()
}

// requesterName is namespace/name for a requester's ID
// spiffe://<td>/ns/<namespace>/sa/<name>, else the ID as it is.
func requesterName(id string) string {
	_, path, ok := strings.Cut(strings.TrimPrefix(id, "spiffe://"), "/")
	seg := strings.Split(path, "/")
	if !ok || len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
		return id
	}
	return seg[1] + "/" + seg[3]
}
