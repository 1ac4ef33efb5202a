package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func newBundleCommand() *cobra.Command {
	var (
		sf     serverFlags
		format string
	)
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "The trust bundle: the roots workloads must trust now",
		Example: `  meshidctl bundle > root-cert.pem
  meshidctl bundle --format spiffe   # SPIFFE bundle (JWKS), for federation`,
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
		out, err := encodeBundle(b.GetTrustDomain(), roots, format)
		if err != nil {
			return err
		}
		_, err = cmd.OutOrStdout().Write(out)
		return err
	}
	return cmd
}

func encodeBundle(trustDomain string, roots []*x509.Certificate, format string) ([]byte, error) {
	if format == "pem" {
		var out []byte
		for _, c := range roots {
			out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
		}
		return out, nil
	}
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("meshid-ca sent trust domain %q: %w", trustDomain, err)
	}
	out, err := spiffebundle.FromX509Authorities(td, roots).Marshal()
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}
