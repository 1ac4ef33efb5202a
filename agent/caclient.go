package agent

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/jwtsvid/jwtsvidpb"
)

// NewCSR makes a PEM certificate request naming only id, signed by key.
func NewCSR(key crypto.Signer, id spiffeid.ID) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, fmt.Errorf("agent: creating CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// CAKeepalive is how a client of meshid-ca checks that its connection is
// alive: meshid-ca permits pings this often (server.KeepaliveEnforcement).
var CAKeepalive = keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}

// DialCA connects to a CA over TLS. The CA's certificate must chain to one
// of roots() as they are at each handshake, not as they were when dialing:
// once a root rotation switches signing, meshid-ca serves a certificate
// under the new root, and a reconnecting agent must trust the bundle it has
// reloaded since. serverName is the name that certificate must carry
// (empty: the host of addr).
func DialCA(addr string, roots func() []*x509.Certificate, serverName string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if roots == nil {
		return nil, errors.New("agent: dialing CA: no roots to verify it against")
	}
	if serverName == "" {
		serverName = hostOf(addr)
	}
	if serverName == "" {
		// An empty name would make x509 skip the name check altogether.
		return nil, fmt.Errorf("agent: dialing CA %s: no server name to verify its certificate against", addr)
	}
	tc := &tls.Config{
		ServerName: serverName, // also gRPC's authority, so SNI and the check agree
		MinVersion: tls.VersionTLS12,
		// crypto/tls can only verify against a pool fixed in the Config.
		// Its check is switched off to be replaced, not dropped:
		// VerifyConnection runs on every handshake and does the same check
		// (chain, server name, serverAuth) against the roots of the moment.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return VerifyCA(cs.PeerCertificates, roots(), serverName)
		},
	}
	opts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		// A connection whose packets are lost (a partition, a node gone
		// without a FIN) would hold every renewal until the OS gives up on
		// it, minutes later: pings find it dead within CAKeepalive's Time
		// plus Timeout, even between requests, and a new one is dialled.
		grpc.WithKeepaliveParams(CAKeepalive),
		// grpc-go's own reconnect backoff grows to 2 minutes, which could
		// outlast a short certificate after an outage; the manager's
		// retries are spaced already.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 500 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
	}, opts...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("agent: dialing CA %s: %w", addr, err)
	}
	return conn, nil
}

// MaxClockBehind is how far this node's clock may be behind the CA's for
// VerifyCA to take a serving certificate that is not valid yet by it: a
// meshid-ca just restarted serves a new one, and a node minutes behind would
// otherwise be locked out until its own clock caught up.
const MaxClockBehind = 15 * time.Minute

// verifyTime is when the CA's serving certificate is judged: now, or its
// NotBefore if that is at most MaxClockBehind ahead.
func verifyTime(leaf *x509.Certificate, now time.Time) time.Time {
	if now.Before(leaf.NotBefore) && leaf.NotBefore.Sub(now) <= MaxClockBehind {
		return leaf.NotBefore
	}
	return now
}

// VerifyCA checks the CA's serving chain, leaf first, as crypto/tls would
// with roots as RootCAs and serverName as ServerName. Clients that must
// follow a root rotation (DialCA, meshidctl) call it from
// tls.Config.VerifyConnection with the roots of the moment.
func VerifyCA(peer []*x509.Certificate, roots []*x509.Certificate, serverName string) error {
	if len(peer) == 0 {
		return errors.New("agent: CA presented no certificate")
	}
	if len(roots) == 0 {
		return errors.New("agent: no trusted roots to verify the CA's certificate against")
	}
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range peer[1:] {
		inter.AddCert(c)
	}
	_, err := peer[0].Verify(x509.VerifyOptions{
		Roots:         rootPool,
		Intermediates: inter,
		CurrentTime:   verifyTime(peer[0], time.Now()),
		DNSName:       serverName,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	var wrongName x509.HostnameError
	if errors.As(err, &wrongName) {
		names := slices.Clone(peer[0].DNSNames)
		for _, ip := range peer[0].IPAddresses {
			names = append(names, ip.String())
		}
		return fmt.Errorf("agent: the CA's certificate is not for %q; it names %s: dial one of those, or set the name to verify (meshid-agent --ca-server-name, Istio's agent: the CA_ADDR host): %w",
			serverName, strings.Join(names, ", "), err)
	}
	if err != nil {
		return fmt.Errorf("agent: CA's certificate does not verify against the %d trusted roots: %w", len(roots), err)
	}
	return nil
}

// hostOf is the host in a CA address, host:port or a gRPC target such as
// dns:///host:port, as gRPC takes it for the server name.
func hostOf(addr string) string {
	if _, rest, ok := strings.Cut(addr, "://"); ok {
		if _, endpoint, ok := strings.Cut(rest, "/"); ok {
			addr = endpoint
		}
	}
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// CAClient asks an Istio-compatible CA for certificates.
type CAClient struct {
	client    pb.IstioCertificateServiceClient
	jwt       jwtsvidpb.JWTSVIDServiceClient
	clusterID string
}

// NewCAClient uses conn; clusterID is sent as Istio's agent does (may be empty).
func NewCAClient(conn grpc.ClientConnInterface, clusterID string) *CAClient {
	return &CAClient{client: pb.NewIstioCertificateServiceClient(conn), jwt: jwtsvidpb.NewJWTSVIDServiceClient(conn), clusterID: clusterID}
}

// Sign sends csrPEM with token as bearer credentials and returns the chain,
// leaf first and root last.
func (c *CAClient) Sign(ctx context.Context, csrPEM []byte, token string, ttl time.Duration) ([]*x509.Certificate, error) {
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token, "clusterid", c.clusterID)
	resp, err := c.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64(ttl / time.Second),
	})
	if err != nil {
		return nil, err
	}
	return ParseChain(resp.GetCertChain())
}

// ParseChain decodes a CreateCertificate response: the leaf, any
// intermediates, and last the trust bundle, which during a root rotation
// holds several roots (istiod sends its whole root-cert.pem there). It
// returns the leaf and intermediates followed by the one root among those
// that issued the certificate before it.
func ParseChain(pemChain []string) ([]*x509.Certificate, error) {
	if len(pemChain) < 2 {
		return nil, errors.New("agent: CA returned fewer than 2 certificates")
	}
	last := len(pemChain) - 1
	chain := make([]*x509.Certificate, 0, len(pemChain))
	for i, p := range pemChain[:last] {
		certs, err := ca.ParseCertificatesPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("agent: chain element %d: %w", i, err)
		}
		chain = append(chain, certs...)
	}
	roots, err := ca.ParseCertificatesPEM([]byte(pemChain[last]))
	if err != nil {
		return nil, fmt.Errorf("agent: chain element %d (roots): %w", last, err)
	}
	root, err := issuerAmong(chain[len(chain)-1], roots)
	if err != nil {
		return nil, err
	}
	return append(chain, root), nil
}

// issuerAmong returns the root among roots whose key signed c.
func issuerAmong(c *x509.Certificate, roots []*x509.Certificate) (*x509.Certificate, error) {
	for _, r := range roots {
		if c.CheckSignatureFrom(r) == nil {
			return r, nil
		}
	}
	return nil, fmt.Errorf("agent: none of the %d roots the CA sent issued the certificate before them (issuer %q)", len(roots), c.Issuer)
}
