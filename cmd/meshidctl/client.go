package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/admin/adminpb"
)

// serverFlags are how a command reaches meshid-ca's admin API.
type serverFlags struct {
	server     string
	serverName string
	caFile     string
	certFile   string
	keyFile    string
	token      string
	tokenFile  string
	timeout    time.Duration

	mu      sync.Mutex
	trusted []*x509.Certificate // --ca-file's roots and any trust adds
}

// trust adds roots meshid-ca reported over a connection already verified:
// during a root rotation its certificate moves to the new root, and a
// command that outlives the switch (rotate --wait) must still reconnect.
func (f *serverFlags) trust(roots []*x509.Certificate) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range roots {
		if !slices.ContainsFunc(f.trusted, r.Equal) {
			f.trusted = append(f.trusted, r)
		}
	}
}

// verify checks the CA's certificate chain against the roots trusted now.
func (f *serverFlags) verify(cs tls.ConnectionState) error {
	f.mu.Lock()
	roots := slices.Clone(f.trusted)
	f.mu.Unlock()
	return agent.VerifyCA(cs.PeerCertificates, roots, cs.ServerName)
}

func (f *serverFlags) add(cmd *cobra.Command) {
	fs := cmd.Flags()
	fs.StringVar(&f.server, "server", "localhost:15013", "meshid-ca's admin API address (host:port)")
	fs.StringVar(&f.serverName, "server-name", "", "name the CA's certificate must carry (default: the host of --server; localhost for a loopback address)")
	fs.StringVar(&f.caFile, "ca-file", "", "PEM roots the CA's certificate must chain to: meshid's root-cert.pem (required)")
	fs.StringVar(&f.certFile, "cert", "", "client certificate (PEM) whose SPIFFE ID is on meshid-ca's --admin-ids")
	fs.StringVar(&f.keyFile, "key", "", "private key (PEM) of --cert")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the token of a service account on meshid-ca's --admin-service-accounts")
	fs.StringVar(&f.token, "token", "", "the token itself (prefer --token-file: a token on the command line shows in the process list)")
	fs.DurationVar(&f.timeout, "timeout", 10*time.Second, "how long to wait for meshid-ca")
}

// dial validates the flags (usage errors, exit 2) and connects.
func (f *serverFlags) dial() (adminpb.AdminClient, func(), error) {
	if f.caFile == "" {
		return nil, nil, usageErrorf("--ca-file is required: the root meshid-ca's certificate chains to (root-cert.pem)")
	}
	if (f.certFile == "") != (f.keyFile == "") {
		return nil, nil, usageErrorf("--cert and --key go together")
	}
	if f.token != "" && f.tokenFile != "" {
		return nil, nil, usageErrorf("--token and --token-file are exclusive")
	}
	if f.certFile == "" && f.token == "" && f.tokenFile == "" {
		return nil, nil, usageErrorf("credentials needed: --cert and --key, or --token-file")
	}
	host, _, err := net.SplitHostPort(f.server)
	if err != nil {
		return nil, nil, usageErrorf("--server %q: %v", f.server, err)
	}
	pemRoots, err := os.ReadFile(f.caFile)
	if err != nil {
		return nil, nil, usageErrorf("--ca-file: %v", err)
	}
	roots, err := ca.ParseCertificatesPEM(pemRoots)
	if err != nil {
		return nil, nil, usageErrorf("--ca-file %s: %v", f.caFile, err)
	}
	f.trust(roots)
	// Go's own verification is replaced by verify, which reads the roots
	// at each handshake (see trust); it checks the same things.
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: f.serverName, InsecureSkipVerify: true, VerifyConnection: f.verify}
	if cfg.ServerName == "" {
		cfg.ServerName = host
		// meshid-ca's certificate names localhost, not loopback addresses
		// (as for a kubectl port-forward).
		if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
			cfg.ServerName = "localhost"
		}
	}
	if f.certFile != "" {
		pair, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
		if err != nil {
			return nil, nil, usageErrorf("--cert/--key: %v", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}
	if tok, err := f.readToken(); err != nil {
		return nil, nil, err
	} else if tok != "" {
		opts = append(opts, grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok), method, req, reply, cc, opts...)
		}))
	}
	conn, err := grpc.NewClient(f.server, opts...)
	if err != nil {
		return nil, nil, usageErrorf("--server: %v", err)
	}
	return adminpb.NewAdminClient(conn), func() { conn.Close() }, nil
}

func (f *serverFlags) readToken() (string, error) {
	if f.tokenFile == "" {
		return strings.TrimSpace(f.token), nil
	}
	b, err := os.ReadFile(f.tokenFile)
	if err != nil {
		return "", usageErrorf("--token-file: %v", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", usageErrorf("--token-file %s is empty", f.tokenFile)
	}
	return tok, nil
}

// connect dials (see dial) and returns the client, a context bounded by
// --timeout, and one function to release both.
func (f *serverFlags) connect(cmd *cobra.Command) (adminpb.AdminClient, context.Context, func(), error) {
	client, closeConn, err := f.dial()
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), f.timeout)
	return client, ctx, func() { cancel(); closeConn() }, nil
}

// bundleRoots asks meshid-ca for the roots it trusts now.
func bundleRoots(ctx context.Context, f *serverFlags, client adminpb.AdminClient) (*adminpb.Bundle, []*x509.Certificate, error) {
	b, err := client.GetBundle(ctx, &adminpb.GetBundleRequest{})
	if err != nil {
		return nil, nil, callError(f, err)
	}
	var roots []*x509.Certificate
	for _, der := range b.GetRoots() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, nil, fmt.Errorf("meshid-ca sent a root that does not parse: %w", err)
		}
		roots = append(roots, c)
	}
	return b, roots, nil
}

// callError words a failed admin call for a person; NotFound exits 3.
func callError(f *serverFlags, err error) error {
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.NotFound:
		return notFoundErrorf("%s", st.Message())
	case codes.InvalidArgument:
		return usageErrorf("%s", st.Message())
	case codes.Unavailable, codes.DeadlineExceeded:
		return fmt.Errorf("meshid-ca at %s: %s", f.server, st.Message())
	case codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Errorf("meshid-ca at %s refused: %s", f.server, st.Message())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("meshid-ca at %s: no answer within the timeout", f.server)
	}
	return fmt.Errorf("meshid-ca at %s: %s", f.server, st.Message())
}
