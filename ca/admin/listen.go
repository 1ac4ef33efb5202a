package admin

import (
	"crypto/tls"
	"crypto/x509"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/meshid/meshid/ca"
)

// NewGRPCServer serves s over TLS with the CA's own serving certificate
// (getCertificate), asking clients for a certificate and verifying any
// they send against the CA's current roots. Every call goes through
// s.Interceptor.
func NewGRPCServer(s *Server, issuers ca.IssuerSource, getCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)) *grpc.Server {
	base := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: getCertificate,
		NextProtos:     []string{"h2"},
		ClientAuth:     tls.VerifyClientCertIfGiven,
	}
	cfg := base.Clone()
	// The roots change on a plug-in CA reload: read them per handshake.
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.ClientCAs = x509.NewCertPool()
		if is := issuers.Issuer(); is != nil {
			for _, r := range is.Roots() {
				c.ClientCAs.AddCert(r)
			}
		}
		return c, nil
	}
	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(cfg)),
		grpc.MaxRecvMsgSize(64<<10),
		grpc.MaxHeaderListSize(64<<10),
		grpc.UnaryInterceptor(s.Interceptor),
	)
	s.Register(g)
	return g
}
