package sds

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
)

// Resource names, as Istio's proxy asks for them.
const (
	WorkloadCertName = "default"
	RootCertName     = "ROOTCA"
)

// SecretType is the type URL of every resource served.
const SecretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// Resolver decides which workload a stream is: the pod's own identity in
// pod mode, the identity the stream's token proves in node mode. ctx
// carries the stream's metadata. It is called only for streams that ask
// for the workload certificate.
type Resolver interface {
	Resolve(ctx context.Context) (*agent.Handle, error)
}

// Bundle is the trust bundle served as ROOTCA; *agent.Bundle is one.
type Bundle interface {
	Roots() []*x509.Certificate
	Changed() <-chan struct{}
}

// Server serves Envoy's SecretDiscoveryService.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer

	resolver Resolver
	bundle   Bundle
	log      *slog.Logger
	streams  atomic.Int64
	nonces   atomic.Uint64
}

// New serves workload certificates found by resolver and roots from bundle.
func New(resolver Resolver, bundle Bundle, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{resolver: resolver, bundle: bundle, log: log}
}

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) {
	secretv3.RegisterSecretDiscoveryServiceServer(g, s)
}

// OpenStreams counts the streams open now, for metrics.
func (s *Server) OpenStreams() int64 { return s.streams.Load() }

func (s *Server) nonce() string { return strconv.FormatUint(s.nonces.Add(1), 10) }

// checkNames refuses names this server does not serve, and the wrong type.
func checkNames(typeURL string, names []string) error {
	if typeURL != "" && typeURL != SecretType {
		return status.Errorf(codes.InvalidArgument, "sds: type %q is not served; only %s", typeURL, SecretType)
	}
	for _, n := range names {
		if n != WorkloadCertName && n != RootCertName {
			return status.Errorf(codes.InvalidArgument, "sds: unknown resource %q: only %q (workload certificate) and %q (trust bundle) are served", n, WorkloadCertName, RootCertName)
		}
	}
	return nil
}

// state is what a stream may see: its workload (resolved on first need)
// and the bundle.
type state struct {
	s        *Server
	ctx      context.Context
	workload *agent.Handle
	expired  <-chan time.Time // fires when the token that proved the workload expires
}

func (st *state) close() {
	if st.workload != nil {
		st.workload.Release()
	}
}

// need resolves the workload if names include it.
func (st *state) need(names []string) error {
	if st.workload != nil || !slices.Contains(names, WorkloadCertName) {
		return nil
	}
	w, err := st.s.resolver.Resolve(st.ctx)
	if err != nil {
		return err
	}
	st.workload = w
	if until := w.Until(); !until.IsZero() {
		st.expired = time.After(time.Until(until))
	}
	return nil
}

// errTokenExpired ends a stream whose token expired: the proxy reconnects
// with the fresh token kubelet has written meanwhile.
var errTokenExpired = status.Error(codes.Unauthenticated, "sds: the stream's token expired; reconnect with a fresh one")

// changes returns channels closed at the next change of what the stream sees.
func (st *state) changes() (workload, bundle <-chan struct{}) {
	if st.workload != nil {
		workload = st.workload.Changed()
	}
	return workload, st.s.bundle.Changed()
}

// secret builds resource name at its current version; nil when there is
// none yet (no certificate).
func (st *state) secret(name string) (*tlsv3.Secret, string, error) {
	switch name {
	case WorkloadCertName:
		svid := st.workload.SVID()
		if svid == nil {
			return nil, "", nil
		}
		return workloadSecret(svid)
	case RootCertName:
		return rootSecret(st.s.bundle.Roots())
	}
	return nil, "", fmt.Errorf("sds: unknown resource %q", name)
}

func workloadSecret(svid *agent.SVID) (*tlsv3.Secret, string, error) {
	sec := &tlsv3.Secret{
		Name: WorkloadCertName,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(svid.ChainPEM()),
			PrivateKey:       inline(svid.KeyPEM()),
		}},
	}
	return sec, svid.Leaf().SerialNumber.Text(16), nil
}

func rootSecret(roots []*x509.Certificate) (*tlsv3.Secret, string, error) {
	if len(roots) == 0 {
		return nil, "", nil
	}
	var bundle bytes.Buffer
	h := sha256.New()
	for _, r := range roots {
		bundle.Write(ca.EncodePEM(r))
		h.Write(r.Raw)
	}
	sec := &tlsv3.Secret{
		Name: RootCertName,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inline(bundle.Bytes()),
		}},
	}
	return sec, hex.EncodeToString(h.Sum(nil))[:16], nil
}

func inline(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}}
}

// resource is one secret ready to send.
type resource struct {
	name    string
	version string
	any     *anypb.Any
}

// build returns the named resources that exist now. Every secret is checked
// with go-control-plane's Validate before it can be sent.
func (st *state) build(names []string) ([]resource, error) {
	var out []resource
	for _, name := range names {
		sec, version, err := st.secret(name)
		if err != nil {
			return nil, err
		}
		if sec == nil {
			continue
		}
		if err := sec.Validate(); err != nil {
			return nil, fmt.Errorf("sds: secret %s fails validation: %w", name, err)
		}
		a, err := anypb.New(sec)
		if err != nil {
			return nil, fmt.Errorf("sds: %w", err)
		}
		out = append(out, resource{name: name, version: version, any: a})
	}
	return out, nil
}

// versionOf is a stream-level version over the resources sent.
func versionOf(rs []resource) string {
	var parts []string
	for _, r := range rs {
		parts = append(parts, r.name+"="+r.version)
	}
	return fmt.Sprint(parts)
}

// receive reads a stream's requests in the background, so the serving loop
// can wait on them and on secret changes at once.
func receive[T any](ctx context.Context, recv func() (T, error)) (<-chan T, <-chan error) {
	reqs := make(chan T)
	errc := make(chan error, 1)
	go func() {
		for {
			req, err := recv()
			if err != nil {
				errc <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()
	return reqs, errc
}

// serveLoop sends what changed and handles the stream's requests until it
// ends: the client goes away, or the token that proved the workload expires.
func serveLoop[T any](st *state, reqs <-chan T, recvErr <-chan error, send func() error, handle func(T) error) error {
	for {
		// Take the change channels before comparing what is current with
		// what was sent: a change in between then still wakes us.
		wch, bch := st.changes()
		if err := send(); err != nil {
			return err
		}
		select {
		case err := <-recvErr:
			if errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		case <-st.ctx.Done():
			return nil
		case <-st.expired:
			return errTokenExpired
		case req := <-reqs:
			if err := handle(req); err != nil {
				return err
			}
		case <-wch:
		case <-bch:
		}
	}
}

// FetchSecrets answers one request with the current secrets.
func (s *Server) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	if err := checkNames(req.GetTypeUrl(), req.GetResourceNames()); err != nil {
		return nil, err
	}
	st := &state{s: s, ctx: ctx}
	defer st.close()
	if err := st.need(req.GetResourceNames()); err != nil {
		return nil, err
	}
	rs, err := st.build(req.GetResourceNames())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if len(rs) < len(req.GetResourceNames()) {
		return nil, status.Error(codes.Unavailable, "sds: no certificate yet")
	}
	return s.response(rs), nil
}

func (s *Server) response(rs []resource) *discoveryv3.DiscoveryResponse {
	resp := &discoveryv3.DiscoveryResponse{VersionInfo: versionOf(rs), TypeUrl: SecretType, Nonce: s.nonce()}
	for _, r := range rs {
		resp.Resources = append(resp.Resources, r.any)
	}
	return resp
}

// StreamSecrets serves state-of-the-world SDS as Envoy uses it: a stream per
// resource name (several are accepted), the node on the first request, an
// ACK or NACK for every response by nonce, and a new response pushed as soon
// as a served secret changes.
func (s *Server) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	s.streams.Add(1)
	defer s.streams.Add(-1)
	ctx := stream.Context()
	st := &state{s: s, ctx: ctx}
	defer st.close()

	reqs, recvErr := receive(ctx, stream.Recv)

	var (
		names     []string
		node      string
		lastNonce string
		sent      string // version of the last response
	)
	send := func() error {
		rs, err := st.build(names)
		if err != nil {
			s.log.Error("sds: building secrets", "node", node, "error", err)
			return status.Error(codes.Internal, "sds: cannot build secrets")
		}
		if len(rs) == 0 {
			return nil // nothing to serve yet; pushed when it arrives
		}
		v := versionOf(rs)
		if v == sent {
			return nil
		}
		resp := s.response(rs)
		if err := stream.Send(resp); err != nil {
			return err
		}
		sent, lastNonce = v, resp.Nonce
		s.log.Debug("sds: pushed", "node", node, "resources", names, "version", v)
		return nil
	}
	return serveLoop(st, reqs, recvErr, send, func(req *discoveryv3.DiscoveryRequest) error {
		if node == "" && req.GetNode() != nil {
			node = req.GetNode().GetId()
		}
		if n := req.GetResponseNonce(); n != "" && n != lastNonce {
			return nil // an answer to an older response: superseded
		}
		if d := req.GetErrorDetail(); d != nil {
			// A NACK: Envoy keeps what it had. Sending the same again
			// would be refused again, so wait for a change.
			s.log.Warn("sds: proxy rejected secrets", "node", node, "resources", names, "error", d.GetMessage())
			return nil
		}
		if err := checkNames(req.GetTypeUrl(), req.GetResourceNames()); err != nil {
			return err
		}
		if req.GetResponseNonce() != "" && slices.Equal(req.GetResourceNames(), names) {
			return nil // ACK of what we sent
		}
		names = slices.Clone(req.GetResourceNames())
		if err := st.need(names); err != nil {
			return err
		}
		sent = "" // a new or changed subscription gets an answer, at the loop's top
		return nil
	})
}
