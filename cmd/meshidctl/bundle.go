package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

func newBundleCommand() *cobra.Command {
	var (
		sf     serverFlags
		format string
	)
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "The trust bundle: the roots workloads must trust now (and the JWT-SVID keys); federated trust domains' bundles",
		Example: `  meshidctl bundle > root-cert.pem
  meshidctl bundle --format spiffe   # SPIFFE bundle (JWKS: X.509 roots and JWT-SVID keys), for federation
  meshidctl bundle list              # the federated trust domains, with each bundle's age
  meshidctl bundle show spire.example`,
		Args: cobra.NoArgs,
	}
	cmd.Flags().StringVar(&format, "format", "pem", "pem (concatenated roots) or spiffe (SPIFFE bundle, JWKS)")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if format != "pem" && format != "spiffe" {
			return usageErrorf("--format must be pem or spiffe, not %q", format)
		}
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		b, roots, err := bundleRoots(ctx, &sf, client)
		if err != nil {
			return err
		}
		out, err := encodeBundle(b, roots, format)
		if err != nil {
			return err
		}
		_, err = cmd.OutOrStdout().Write(out)
		return err
	}
	cmd.AddCommand(newBundleListCommand(), newBundleShowCommand())
	return cmd
}

func encodeBundle(b *adminpb.Bundle, roots []*x509.Certificate, format string) ([]byte, error) {
	if format == "pem" {
		var out []byte
		for _, c := range roots {
			out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
		}
		return out, nil
	}
	td, err := spiffeid.TrustDomainFromString(b.GetTrustDomain())
	if err != nil {
		return nil, fmt.Errorf("meshid-ca sent trust domain %q: %w", b.GetTrustDomain(), err)
	}
	sb := spiffebundle.FromX509Authorities(td, roots)
	for kid, der := range b.GetJwtAuthorities() {
		key, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			return nil, fmt.Errorf("meshid-ca sent JWT key %q that does not parse: %w", kid, err)
		}
		if err := sb.AddJWTAuthority(kid, key); err != nil {
			return nil, err
		}
	}
	out, err := sb.Marshal()
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

// federatedRow is a federated trust domain as listed.
type federatedRow struct {
	TrustDomain      string     `json:"trustDomain"`
	BundleEndpoint   string     `json:"bundleEndpointURL"`
	Profile          string     `json:"profile"`
	EndpointSPIFFEID string     `json:"endpointSPIFFEID,omitempty"`
	Source           string     `json:"source,omitempty"`
	X509Authorities  int        `json:"x509Authorities"`
	JWTAuthorities   int        `json:"jwtAuthorities"`
	FetchedAt        *time.Time `json:"fetchedAt,omitempty"`
	Refresh          string     `json:"refresh"`
	Stale            bool       `json:"stale"`
	LastError        string     `json:"lastError,omitempty"`
}

func listFederated(ctx context.Context, sf *serverFlags, client adminpb.AdminClient) ([]*adminpb.FederatedBundle, error) {
	resp, err := client.ListFederatedBundles(ctx, &adminpb.ListFederatedBundlesRequest{})
	if err != nil {
		return nil, callError(sf, err)
	}
	return resp.GetBundles(), nil
}

func newBundleListCommand() *cobra.Command {
	var sf serverFlags
	cmd := &cobra.Command{
		Use:   "list",
		Short: "The trust domains meshid-ca federates with: where each bundle comes from, its keys, when it was last fetched, stale or not",
		Example: `  meshidctl bundle list
  meshidctl bundle list -o json`,
		Args: cobra.NoArgs,
	}
	output := outputFlag(cmd)
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		bundles, err := listFederated(ctx, &sf, client)
		if err != nil {
			return err
		}
		rows := []federatedRow{}
		for _, b := range bundles {
			rows = append(rows, federatedRow{
				TrustDomain: b.GetTrustDomain(), BundleEndpoint: b.GetBundleEndpointUrl(), Profile: b.GetProfile(),
				EndpointSPIFFEID: b.GetEndpointSpiffeId(), Source: b.GetSource(),
				X509Authorities: int(b.GetX509Authorities()), JWTAuthorities: int(b.GetJwtAuthorities()),
				FetchedAt: timePtr(b.GetFetchedAt()), Refresh: b.GetRefresh().AsDuration().String(),
				Stale: b.GetStale(), LastError: b.GetLastError(),
			})
		}
		return render(cmd.OutOrStdout(), *output, rows, func(w io.Writer) error {
			return federatedTable(w, rows, time.Now())
		})
	}
	return cmd
}

func federatedTable(w io.Writer, rows []federatedRow, now time.Time) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(w, "meshid-ca federates with no trust domain (--federation-file)")
		return err
	}
	t := newTable(w, "TRUST DOMAIN", "ENDPOINT", "PROFILE", "FROM", "X509", "JWT", "FETCHED", "REFRESH", "STATE")
	for _, r := range rows {
		fetched, state := "never", "ok"
		if r.FetchedAt != nil {
			fetched = humanDuration(now.Sub(*r.FetchedAt)) + " ago"
		}
		if r.Stale {
			state = "stale (still trusted)"
		}
		if r.LastError != "" {
			state += ": " + r.LastError
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", r.TrustDomain, r.BundleEndpoint, r.Profile, orDash(r.Source), r.X509Authorities, r.JWTAuthorities, fetched, r.Refresh, state)
	}
	return t.Flush()
}

func newBundleShowCommand() *cobra.Command {
	var (
		sf     serverFlags
		format string
	)
	cmd := &cobra.Command{
		Use:   "show TRUST_DOMAIN",
		Short: "A federated trust domain's bundle as meshid-ca holds it",
		Example: `  meshidctl bundle show spire.example                # SPIFFE bundle (JWKS)
  meshidctl bundle show spire.example --format pem   # its X.509 roots`,
		Args: cobra.ExactArgs(1),
	}
	cmd.Flags().StringVar(&format, "format", "spiffe", "spiffe (SPIFFE bundle, JWKS) or pem (its X.509 roots)")
	sf.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if format != "pem" && format != "spiffe" {
			return usageErrorf("--format must be pem or spiffe, not %q", format)
		}
		td, err := spiffeid.TrustDomainFromString(args[0])
		if err != nil {
			return usageErrorf("%q is not a trust domain: %v", args[0], err)
		}
		client, ctx, done, err := sf.connect(cmd)
		if err != nil {
			return err
		}
		defer done()
		bundles, err := listFederated(ctx, &sf, client)
		if err != nil {
			return err
		}
		for _, b := range bundles {
			if b.GetTrustDomain() != td.Name() {
				continue
			}
			if len(b.GetBundle()) == 0 {
				return fmt.Errorf("meshid-ca holds no bundle for %s yet (last error: %s)", td, orDash(b.GetLastError()))
			}
			if format == "spiffe" {
				_, err := cmd.OutOrStdout().Write(append(b.GetBundle(), '\n'))
				return err
			}
			parsed, err := spiffebundle.Parse(td, b.GetBundle())
			if err != nil {
				return fmt.Errorf("meshid-ca sent a bundle for %s that does not parse: %w", td, err)
			}
			for _, c := range parsed.X509Authorities() {
				if err := pem.Encode(cmd.OutOrStdout(), &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}); err != nil {
					return err
				}
			}
			return nil
		}
		return notFoundErrorf("meshid-ca does not federate with %s (meshidctl bundle list)", td)
	}
	return cmd
}
