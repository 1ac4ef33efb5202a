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
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/ca"
)

// NewCSR makes a PEM certificate request naming only id, signed by key.
func NewCSR(key crypto.Signer, id spiffeid.ID) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, fmt.Errorf("agent: creating CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// DialCA connects to a CA over TLS, trusting only roots. serverName is the
// name its certificate must carry (empty: the host of addr).
func DialCA(addr string, roots *x509.CertPool, serverName string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	tc := &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc))}, opts...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("agent: dialing CA %s: %w", addr, err)
	}
	return conn, nil
}

// CAClient asks an Istio-compatible CA for certificates.
type CAClient struct {
	client    pb.IstioCertificateServiceClient
	clusterID string
}

// NewCAClient uses conn; clusterID is sent as Istio's agent does (may be empty).
func NewCAClient(conn grpc.ClientConnInterface, clusterID string) *CAClient {
	return &CAClient{client: pb.NewIstioCertificateServiceClient(conn), clusterID: clusterID}
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
