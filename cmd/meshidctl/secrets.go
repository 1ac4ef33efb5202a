package main

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/sds"
)

// Where meshid-agent serves SDS by default (its --sds-socket), relative to
// the proxy's working directory as Istio's proxy looks for it.
const defaultSDSSocket = "./var/run/secrets/workload-spiffe-uds/socket"

// Secret types and statuses, as istioctl proxy-config secret shows them.
const (
	typeCertChain = "Cert Chain"
	typeCA        = "CA"

	secretValid    = "VALID"
	secretExpiring = "EXPIRING"
	secretExpired  = "EXPIRED"
	secretNotYet   = "NOT YET VALID"
)

func newSecretsCommand() *cobra.Command {
	var (
		socket    string
		names     []string
		tokenFile string
		expiring  time.Duration
		timeout   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "secrets",
		Short: "Show the secrets an agent serves over SDS, as Envoy gets them",
		Long: `secrets asks meshid-agent over its SDS socket for the secrets Envoy asks for
(FetchSecrets; a stream as Envoy opens one when the agent holds no certificate
for the caller yet, or serves no FetchSecrets, as Istio's pilot-agent) and shows each: type, status, serial, validity, SPIFFE ID and
the version the agent reported. ROOTCA gets one row per root (several during a
root rotation). The private key served with "default" is never shown nor kept:
it is only checked against the leaf (KEY MATCHES).

VALID CERT is true when the certificate is within its validity and, for the
workload certificate, its key matches and its chain verifies to the ROOTCA
served beside it (when ROOTCA is fetched too); "problems" in -o json|yaml says
why not. STATUS is EXPIRING when less than --expiring-within is left.

In node mode the agent serves a proxy the identity its token proves: give the
token with --token-file (sent as "authorization: Bearer <token>").`,
		Example: `  meshidctl secrets --socket ./var/run/secrets/workload-spiffe-uds/socket
  meshidctl secrets --socket /run/meshid/socket --token-file /var/run/secrets/tokens/istio-token -o json
  meshidctl secrets --names ROOTCA -o yaml`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 0 {
				return usageErrorf("secrets takes no arguments; got %q", args)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&socket, "socket", defaultSDSSocket, "the agent's SDS Unix socket")
	cmd.Flags().StringSliceVar(&names, "names", []string{sds.WorkloadCertName, sds.RootCertName}, "resources to fetch")
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "send this file's token as authorization: Bearer <token> (node mode)")
	cmd.Flags().DurationVar(&expiring, "expiring-within", 10*time.Minute, "status EXPIRING when less than this is left")
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Second, "give up after this long")
	output := outputFlag(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if len(names) == 0 {
			return usageErrorf("--names: give at least one resource name")
		}
		if timeout <= 0 {
			return usageErrorf("--timeout must be positive")
		}
		path, err := filepath.Abs(socket) // gRPC's unix:// targets must be absolute
		if err != nil {
			return usageErrorf("--socket %s: %w", socket, err)
		}
		var token string
		if tokenFile != "" {
			b, err := os.ReadFile(tokenFile)
			if err != nil {
				return usageErrorf("--token-file: %w", err)
			}
			if token = strings.TrimSpace(string(b)); token == "" {
				return usageErrorf("--token-file %s is empty", tokenFile)
			}
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
		defer cancel()
		served, fetchErr := fetchSecrets(ctx, path, token, names, timeout)
		if len(served) == 0 {
			return fetchErr
		}
		report := secretsReport{Socket: path, Secrets: secretRows(served, time.Now(), expiring)}
		if err := render(cmd.OutOrStdout(), *output, report, report.table); err != nil {
			return err
		}
		return fetchErr
	}
	return cmd
}

// servedSecret is one secret as the agent served it, the private key
// already checked and dropped.
type servedSecret struct {
	name    string
	version string
	typ     string              // typeCertChain or typeCA
	certs   []*x509.Certificate // the chain, leaf first; or the roots
	boundTo []string            // a SPIFFE validator's: each root's trust domain ID, by index
	order   error               // the chain is out of order
	keyErr  string              // why the key does not match; "" if it does
}

// fetchSecrets gets each name from the agent at path. It returns what it
// got, and an error for what it did not.
func fetchSecrets(ctx context.Context, path, token string, names []string, timeout time.Duration) ([]servedSecret, error) {
	if err := probeSocket(ctx, path); err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("agent at %s: %w", path, err)
	}
	defer conn.Close()
	client := secretv3.NewSecretDiscoveryServiceClient(conn)
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	var served []servedSecret
	var errs []error
	for _, name := range names {
		s, err := fetchSecret(ctx, client, name)
		if err != nil {
			errs = append(errs, fetchError(name, path, timeout, err))
			continue
		}
		served = append(served, s)
	}
	return served, errors.Join(errs...)
}

// probeSocket says clearly when nothing listens at path, rather than
// leaving it to a gRPC "Unavailable".
func probeSocket(ctx context.Context, path string) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("no agent socket at %s (is meshid-agent running? its --sds-socket is where to point --socket)", path)
	case err != nil:
		return fmt.Errorf("agent socket: %w", err)
	case fi.Mode().Type() != os.ModeSocket:
		return fmt.Errorf("%s is not a Unix socket", path)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return fmt.Errorf("cannot connect to the agent at %s: %w", path, err)
	}
	return c.Close()
}

func fetchSecret(ctx context.Context, client secretv3.SecretDiscoveryServiceClient, name string) (servedSecret, error) {
	req := &discoveryv3.DiscoveryRequest{
		Node:          &corev3.Node{Id: "meshidctl"},
		ResourceNames: []string{name},
		TypeUrl:       sds.SecretType,
	}
	resp, err := client.FetchSecrets(ctx, req)
	switch status.Code(err) {
	case codes.Unavailable:
		// No certificate yet for this caller: the agent has just started,
		// or (node mode) no proxy holds this identity, and a fetch lets go
		// of it at once. A stream holds it until its certificate comes.
		resp, err = streamOnce(ctx, client, req)
	case codes.Unimplemented:
		// Istio's own agent (pilot-agent) serves only streams, which is
		// all Envoy uses.
		resp, err = streamOnce(ctx, client, req)
	}
	if err != nil {
		return servedSecret{}, err
	}
	if len(resp.GetResources()) != 1 {
		return servedSecret{}, fmt.Errorf("the agent sent %d resources, want 1", len(resp.GetResources()))
	}
	var sec tlsv3.Secret
	if err := resp.GetResources()[0].UnmarshalTo(&sec); err != nil {
		return servedSecret{}, fmt.Errorf("the agent sent a %s, not a Secret", resp.GetResources()[0].GetTypeUrl())
	}
	return readSecret(&sec, resp.GetVersionInfo())
}

// streamOnce opens a stream as Envoy does and returns its first response.
func streamOnce(ctx context.Context, client secretv3.SecretDiscoveryServiceClient, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := client.StreamSecrets(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.Send(req); err != nil && !errors.Is(err, io.EOF) { // io.EOF: Recv has the reason
		return nil, err
	}
	resp, err := s.Recv()
	if err == nil {
		s.CloseSend()
	}
	return resp, err
}

func fetchError(name, path string, timeout time.Duration, err error) error {
	st := status.Convert(err)
	switch st.Code() {
	case codes.DeadlineExceeded:
		return fmt.Errorf("%s: no answer from the agent at %s within %s (--timeout)", name, path, timeout)
	case codes.Unknown:
		return fmt.Errorf("%s: %s", name, st.Message())
	}
	return fmt.Errorf("%s: the agent answered %s: %s", name, st.Code(), st.Message())
}

// readSecret decodes a served secret. The private key is checked against
// the leaf and its bytes are cleared: it is neither returned nor kept.
func readSecret(sec *tlsv3.Secret, version string) (servedSecret, error) {
	s := servedSecret{name: sec.GetName(), version: version}
	switch t := sec.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		s.typ = typeCertChain
		tc := t.TlsCertificate
		keyData, keyErr := inlineData(tc.GetPrivateKey())
		tc.PrivateKey = nil
		defer clear(keyData)
		chain, err := inlineData(tc.GetCertificateChain())
		if err != nil {
			return s, fmt.Errorf("certificate chain: %w", err)
		}
		if s.certs, _, err = decodeChain(chain); err != nil {
			return s, fmt.Errorf("certificate chain: %w", err)
		}
		s.order = checkOrder(s.certs)
		switch {
		case keyErr != nil:
			s.keyErr = "private key: " + keyErr.Error()
		default:
			s.keyErr = checkKey(keyData, s.certs[0])
		}
	case *tlsv3.Secret_ValidationContext:
		s.typ = typeCA
		if t.ValidationContext.GetCustomValidatorConfig() != nil {
			// With federation, the agent serves Envoy's SPIFFE validator:
			// roots bound to their trust domains.
			byTD, err := sds.TrustedRoots(t.ValidationContext)
			if err != nil {
				return s, err
			}
			tds := slices.SortedFunc(maps.Keys(byTD), func(a, b spiffeid.TrustDomain) int { return strings.Compare(a.String(), b.String()) })
			for _, td := range tds {
				for _, r := range byTD[td] {
					s.certs = append(s.certs, r)
					s.boundTo = append(s.boundTo, td.IDString())
				}
			}
			break
		}
		roots, err := inlineData(t.ValidationContext.GetTrustedCa())
		if err != nil {
			return s, fmt.Errorf("trusted CA: %w", err)
		}
		if s.certs, _, err = decodeChain(roots); err != nil {
			return s, fmt.Errorf("trusted CA: %w", err)
		}
	default:
		return s, fmt.Errorf("secret %q is a %T, neither a certificate nor a validation context", sec.GetName(), t)
	}
	return s, nil
}

// inlineData returns a data source's inline content; inline bytes are
// shared with ds, so clearing them clears the message's copy.
func inlineData(ds *corev3.DataSource) ([]byte, error) {
	switch s := ds.GetSpecifier().(type) {
	case *corev3.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case *corev3.DataSource_InlineString:
		return []byte(s.InlineString), nil
	case *corev3.DataSource_Filename:
		return nil, fmt.Errorf("served as a file name (%s), not inline", s.Filename)
	case *corev3.DataSource_EnvironmentVariable:
		return nil, fmt.Errorf("served as an environment variable (%s), not inline", s.EnvironmentVariable)
	}
	return nil, errors.New("not served")
}

// checkKey says why key (PEM or DER) is not leaf's private key, or "" if
// it is. Its messages never include the key.
func checkKey(key []byte, leaf *x509.Certificate) string {
	der := key
	if block, _ := pem.Decode(key); block != nil {
		der = block.Bytes
		defer clear(block.Bytes)
	}
	var parsed any
	var err error
	if parsed, err = x509.ParsePKCS8PrivateKey(der); err != nil {
		if parsed, err = x509.ParseECPrivateKey(der); err != nil {
			if parsed, err = x509.ParsePKCS1PrivateKey(der); err != nil {
				return "the private key does not parse"
			}
		}
	}
	signer, ok := parsed.(crypto.Signer)
	if !ok {
		return "the private key cannot sign"
	}
	pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return "the private key is not the leaf's"
	}
	return ""
}

// secretsReport is what secrets shows.
type secretsReport struct {
	Socket  string      `json:"socket"`
	Secrets []secretRow `json:"secrets"`
}

// secretRow is one certificate served: the workload's leaf, or one root.
type secretRow struct {
	ResourceName string    `json:"resource_name"`
	Type         string    `json:"type"`   // "Cert Chain" or "CA"
	Status       string    `json:"status"` // VALID, EXPIRING, EXPIRED, NOT YET VALID
	ValidCert    bool      `json:"valid_cert"`
	SerialNumber string    `json:"serial_number"` // hex
	NotAfter     time.Time `json:"not_after"`
	NotBefore    time.Time `json:"not_before"`
	SPIFFEID     string    `json:"spiffe_id"`             // a CA's: its trust domain's, or "-"
	KeyMatches   string    `json:"key_matches,omitempty"` // "yes" or "no"; certificate chains only
	Version      string    `json:"version"`               // as the agent reported it
	Problems     []string  `json:"problems,omitempty"`    // why VALID CERT is false
}

// secretRows describes what was served at now: a row for the workload
// leaf, checked against the roots served beside it; a row per root.
func secretRows(served []servedSecret, now time.Time, expiring time.Duration) []secretRow {
	var roots []*x509.Certificate
	var rootsTD []string // "" for a root bound to no trust domain
	var chain []*x509.Certificate
	for _, s := range served {
		switch s.typ {
		case typeCA:
			roots = append(roots, s.certs...)
			for i := range s.certs {
				td := ""
				if i < len(s.boundTo) {
					td = s.boundTo[i]
				}
				rootsTD = append(rootsTD, td)
			}
		case typeCertChain:
			if s.order == nil {
				chain = s.certs
			}
		}
	}
	var rows []secretRow
	for _, s := range served {
		if s.typ == typeCA {
			for i, root := range s.certs {
				r := secretRowOf(s, root, now, expiring)
				if i < len(s.boundTo) {
					r.SPIFFEID = s.boundTo[i]
				} else if id, _ := spiffeIDOf(root); id != "" {
					r.SPIFFEID = trustDomainID(id)
				} else if chain != nil && verifyChain(chain, []*x509.Certificate{root}, now) == nil {
					r.SPIFFEID = trustDomainID(leafID(chain))
				}
				if r.SPIFFEID == "" {
					r.SPIFFEID = "-"
				}
				rows = append(rows, r)
			}
			continue
		}
		r := secretRowOf(s, s.certs[0], now, expiring)
		r.SPIFFEID = leafID(s.certs)
		r.KeyMatches = "yes"
		if s.keyErr != "" {
			r.KeyMatches = "no"
			r.Problems = append(r.Problems, s.keyErr)
		}
		if s.order != nil {
			r.Problems = append(r.Problems, s.order.Error())
		} else if mine := rootsFor(roots, rootsTD, trustDomainID(leafID(s.certs))); len(mine) > 0 {
			if err := verifyChain(s.certs, mine, now); err != nil {
				r.Problems = append(r.Problems, "the chain does not verify to the ROOTCA served: "+verifyReason(err, s.certs, now))
			}
		}
		r.ValidCert = r.ValidCert && len(r.Problems) == 0
		rows = append(rows, r)
	}
	return rows
}

// rootsFor keeps the roots that may vouch for trust domain td: those bound
// to it, and those bound to none.
func rootsFor(roots []*x509.Certificate, boundTo []string, td string) []*x509.Certificate {
	var out []*x509.Certificate
	for i, r := range roots {
		if boundTo[i] == "" || boundTo[i] == td {
			out = append(out, r)
		}
	}
	return out
}

func secretRowOf(s servedSecret, c *x509.Certificate, now time.Time, expiring time.Duration) secretRow {
	r := secretRow{
		ResourceName: s.name,
		Type:         s.typ,
		SerialNumber: c.SerialNumber.Text(16),
		NotAfter:     c.NotAfter.UTC(),
		NotBefore:    c.NotBefore.UTC(),
		Version:      s.version,
	}
	switch {
	case now.Before(c.NotBefore):
		r.Status = secretNotYet
		r.Problems = append(r.Problems, "not valid until "+timestamp(c.NotBefore))
	case !now.Before(c.NotAfter):
		r.Status = secretExpired
		r.Problems = append(r.Problems, "expired "+humanDuration(now.Sub(c.NotAfter))+" ago")
	case c.NotAfter.Sub(now) < expiring:
		r.Status = secretExpiring
	default:
		r.Status = secretValid
	}
	r.ValidCert = r.Status == secretValid || r.Status == secretExpiring
	return r
}

func leafID(chain []*x509.Certificate) string {
	id, _ := spiffeIDOf(chain[0])
	if id == "" {
		return "-"
	}
	return id
}

// trustDomainID is the ID of id's trust domain ("spiffe://cluster.local"),
// or "" if id is none.
func trustDomainID(id string) string {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return ""
	}
	return sid.TrustDomain().IDString()
}

func verifyChain(chain, roots []*x509.Certificate, now time.Time) error {
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

func (r secretsReport) table(w io.Writer) error {
	t := newTable(w, "resource name", "type", "status", "valid cert", "serial number", "not after", "not before", "spiffe id", "key matches", "version")
	for _, s := range r.Secrets {
		fmt.Fprintf(t, "%s\t%s\t%s\t%t\t%s\t%s\t%s\t%s\t%s\t%s\n",
			s.ResourceName, s.Type, s.Status, s.ValidCert, s.SerialNumber,
			timestamp(s.NotAfter), timestamp(s.NotBefore), s.SPIFFEID, orDash(s.KeyMatches), orDash(s.Version))
	}
	return t.Flush()
}
