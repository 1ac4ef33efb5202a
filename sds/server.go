package sds

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
)

// Resource names. Istio's proxy asks for the first two only; the others
// are for Envoy configurations written by hand, named as SPIRE's agent
// names them.
const (
	WorkloadCertName = "default"
	// RootCertName is the trust bundle. Without federation it is the own
	// trust domain's roots as a trusted CA set; with federated trust
	// domains it is Envoy's SPIFFE certificate validator holding every
	// trust domain's roots, each bound to its trust domain, so that a
	// peer's CA cannot vouch for an identity in another trust domain (a
	// combined trusted CA set would let it). Envoy has the validator
	// since 1.18 (Istio 1.10).
	RootCertName = "ROOTCA"
	// AllBundlesName is the SPIFFE certificate validator with every trust
	// domain, federated or not.
	AllBundlesName = "ALL"
	// A trust domain's ID ("spiffe://example.org") names the validator
	// with that trust domain's roots alone; while it is not federated,
	// the validator holds the own trust domain's instead, so that none of
	// its certificates is trusted.
)

// SPIFFEValidatorName is the Envoy extension the validators name.
const SPIFFEValidatorName = "envoy.tls.cert_validator.spiffe"

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
	TrustDomain() spiffeid.TrustDomain
	Roots() []*x509.Certificate
	Federated() map[spiffeid.TrustDomain]*spiffebundle.Bundle
	// OnChange calls f at every change until stop; f must return at once.
	OnChange(f func()) (stop func())
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

// Register adds the service to g, which must be made with ServerOptions.
func (s *Server) Register(g *grpc.Server) {
	secretv3.RegisterSecretDiscoveryServiceServer(g, s)
}

// OpenStreams counts the streams open now, for metrics.
func (s *Server) OpenStreams() int64 { return s.streams.Load() }

func (s *Server) nonce() string { return strconv.FormatUint(s.nonces.Add(1), 10) }

// checkNames refuses names this server does not serve, and the wrong type,
// and returns names without repeats: a request naming "default" a hundred
// thousand times (a megabyte) must not be answered with as many copies of
// the certificate and key.
func checkNames(typeURL string, names []string) ([]string, error) {
	if typeURL != "" && typeURL != SecretType {
		return nil, status.Errorf(codes.InvalidArgument, "sds: type %q is not served; only %s", clip(typeURL), SecretType)
	}
	var out []string
	for _, n := range names {
		if n != WorkloadCertName && n != RootCertName && n != AllBundlesName && !isTrustDomainName(n) {
			return nil, status.Errorf(codes.InvalidArgument, "sds: unknown resource %q: only %q (workload certificate), %q (trust bundle), %q (every trust domain's) and a trust domain's ID (spiffe://example.org) are served", clip(n), WorkloadCertName, RootCertName, AllBundlesName)
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out, nil
}

func isTrustDomainName(n string) bool {
	id, err := spiffeid.FromString(n)
	return err == nil && id.Path() == ""
}

// clip keeps a client's string short enough to quote back to it.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// errTokenExpired ends a stream whose token expired: the proxy reconnects
// with the fresh token kubelet has written meanwhile.
var errTokenExpired = status.Error(codes.Unauthenticated, "sds: the stream's token expired; reconnect with a fresh one")

// stream is one open SDS stream. Its handler's goroutine reads requests;
// what the proxy must be sent is sent by a short-lived goroutine started
// when something changes (at most one per stream at a time). An idle
// stream so holds one goroutine, parked in Recv, however many streams a
// node agent serves. A push that fails, or the expiry of the stream's
// token, ends the stream through its context (see ServerOptions).
type stream struct {
	s      *Server
	ctx    context.Context
	cancel context.CancelCauseFunc
	send   func() error // sends what changed; never runs twice at once
	pushes sync.WaitGroup

	mu        sync.Mutex // after the workload's and the bundle's locks, never before
	node      string
	workload  *agent.Handle // resolved on first need
	stopWatch []func()
	expiry    *time.Timer // ends the stream when the token that proved the workload expires
	pushing   bool
	again     bool
	closed    bool
}

func (s *Server) open(ctx context.Context) (*stream, error) {
	cancel, ok := ctx.Value(streamCancelKey{}).(context.CancelCauseFunc)
	if !ok {
		s.log.Error("sds: the gRPC server was not made with sds.ServerOptions")
		return nil, status.Error(codes.Internal, "sds: server misconfigured")
	}
	st := &stream{s: s, ctx: ctx, cancel: cancel}
	st.stopWatch = append(st.stopWatch, s.bundle.OnChange(st.kick))
	return st, nil
}

// close stops the stream's watches, waits for a push under way (made to
// give up) and releases its workload.
func (st *stream) close() {
	st.mu.Lock()
	st.closed = true
	stops, expiry, w := st.stopWatch, st.expiry, st.workload
	st.mu.Unlock()
	for _, stop := range stops {
		stop()
	}
	if expiry != nil {
		expiry.Stop()
	}
	st.cancel(context.Canceled)
	st.pushes.Wait()
	if w != nil {
		w.Release()
	}
}

// kick has the stream's send run once more, soon, on its own goroutine.
// It runs from watch callbacks, so it must not block.
func (st *stream) kick() {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return
	}
	if st.pushing {
		st.again = true
		return
	}
	st.pushing = true
	st.pushes.Add(1)
	go st.push()
}

func (st *stream) push() {
	defer st.pushes.Done()
	for {
		if err := st.send(); err != nil {
			st.cancel(err) // the handler's Recv returns, and the handler with err
			st.mu.Lock()
			st.pushing = false
			st.mu.Unlock()
			return
		}
		st.mu.Lock()
		if !st.again {
			st.pushing = false
			st.mu.Unlock()
			return
		}
		st.again = false
		st.mu.Unlock()
	}
}

// serve reads requests until the stream ends, handing each to handle.
func serve[T any](st *stream, recv func() (T, error), handle func(T) error) error {
	for {
		req, err := recv()
		if err != nil {
			if cause := context.Cause(st.ctx); cause != nil && !errors.Is(cause, context.Canceled) {
				// Ended by the server: the token expired, or a push
				// failed. gRPC has told the proxy Canceled already.
				_, node := st.current()
				if cause == errTokenExpired {
					st.s.log.Info("sds: stream closed: its token expired", "node", node)
				} else {
					st.s.log.Warn("sds: stream closed: a push failed", "node", node, "error", cause)
				}
				return cause
			}
			if errors.Is(err, io.EOF) || errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		if err := handle(req); err != nil {
			return err
		}
	}
}

func (st *stream) setNode(n *corev3.Node) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.node == "" && n != nil {
		st.node = n.GetId()
	}
}

// current returns what a push needs of the shared state.
func (st *stream) current() (*agent.Handle, string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.workload, st.node
}

// need resolves the workload if names include it. It runs on the
// handler's goroutine only.
func (st *stream) need(names []string) error {
	if w, _ := st.current(); w != nil || !slices.Contains(names, WorkloadCertName) {
		return nil
	}
	w, err := onOwnStack(func() (*agent.Handle, error) { return st.s.resolver.Resolve(st.ctx) })
	if err != nil {
		return err
	}
	stop := w.OnChange(st.kick)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.workload = w
	st.stopWatch = append(st.stopWatch, stop)
	if until := w.Until(); !until.IsZero() {
		st.expiry = time.AfterFunc(time.Until(until), func() { st.cancel(errTokenExpired) })
	}
	return nil
}

// onOwnStack runs f on a goroutine of its own and waits for it. Checking a
// token (signatures, a TokenReview) grows a stack to tens of kilobytes; run
// by a stream's handler, that stack would stay with the stream for its
// whole life, and the runtime would start new goroutines at the grown
// average size.
func onOwnStack[T any](f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f()
		done <- result{v, err}
	}()
	r := <-done
	return r.v, r.err
}

// secret builds resource name at its current version; nil when there is
// none yet (no certificate).
func (s *Server) secret(w *agent.Handle, name string) (*tlsv3.Secret, string, error) {
	switch name {
	case WorkloadCertName:
		if w == nil {
			return nil, "", nil
		}
		svid := w.SVID()
		if svid == nil {
			return nil, "", nil
		}
		return workloadSecret(svid)
	case RootCertName:
		if fed := s.bundle.Federated(); len(fed) > 0 {
			return spiffeSecret(name, s.trustDomains(fed))
		}
		return rootSecret(s.bundle.Roots())
	case AllBundlesName:
		return spiffeSecret(name, s.trustDomains(s.bundle.Federated()))
	}
	if isTrustDomainName(name) {
		td := spiffeid.RequireTrustDomainFromString(name)
		all := s.trustDomains(s.bundle.Federated())
		for _, t := range all {
			if t.td == td {
				return spiffeSecret(name, []trustDomainRoots{t})
			}
		}
		// Not federated (yet, or any more): a validator that trusts none
		// of td's certificates. Sending nothing would leave Envoy trusting
		// what it was sent before the federation was removed.
		return spiffeSecret(name, all[:1])
	}
	return nil, "", fmt.Errorf("sds: unknown resource %q", name)
}

type trustDomainRoots struct {
	td    spiffeid.TrustDomain
	roots []*x509.Certificate
}

// trustDomains is the own trust domain and every federated one with X.509
// authorities, sorted by name.
func (s *Server) trustDomains(fed map[spiffeid.TrustDomain]*spiffebundle.Bundle) []trustDomainRoots {
	out := []trustDomainRoots{{td: s.bundle.TrustDomain(), roots: s.bundle.Roots()}}
	for td, b := range fed {
		if roots := b.X509Authorities(); len(roots) > 0 && td != s.bundle.TrustDomain() {
			out = append(out, trustDomainRoots{td: td, roots: roots})
		}
	}
	slices.SortFunc(out[1:], func(a, b trustDomainRoots) int { return strings.Compare(a.td.String(), b.td.String()) })
	return out
}

// spiffeSecret is Envoy's SPIFFE certificate validator for tds.
func spiffeSecret(name string, tds []trustDomainRoots) (*tlsv3.Secret, string, error) {
	if len(tds) == 0 || len(tds[0].roots) == 0 {
		return nil, "", nil
	}
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	h := sha256.New()
	for _, t := range tds {
		var pem bytes.Buffer
		for _, r := range t.roots {
			pem.Write(ca.EncodePEM(r))
			h.Write(r.Raw)
		}
		h.Write([]byte(t.td.String()))
		cfg.TrustDomains = append(cfg.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{Name: t.td.String(), TrustBundle: inline(pem.Bytes())})
	}
	typed, err := anypb.New(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("sds: %w", err)
	}
	sec := &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: SPIFFEValidatorName, TypedConfig: typed},
		}},
	}
	return sec, "spiffe-" + hex.EncodeToString(h.Sum(nil))[:16], nil
}

// TrustedRoots reads the roots out of a validation context this server
// serves (or Envoy would take): the trusted CA set, or the SPIFFE
// validator's trust domains. The map is keyed by trust domain; a plain
// trusted CA set, bound to none, is under the zero trust domain.
func TrustedRoots(vc *tlsv3.CertificateValidationContext) (map[spiffeid.TrustDomain][]*x509.Certificate, error) {
	out := map[spiffeid.TrustDomain][]*x509.Certificate{}
	if ca := vc.GetTrustedCa(); ca != nil {
		roots, err := parseInlinePEM(ca)
		if err != nil {
			return nil, fmt.Errorf("sds: trusted_ca: %w", err)
		}
		out[spiffeid.TrustDomain{}] = roots
	}
	if cv := vc.GetCustomValidatorConfig(); cv != nil {
		if cv.GetName() != SPIFFEValidatorName {
			return nil, fmt.Errorf("sds: custom validator %q is not %s", cv.GetName(), SPIFFEValidatorName)
		}
		var cfg tlsv3.SPIFFECertValidatorConfig
		if err := cv.GetTypedConfig().UnmarshalTo(&cfg); err != nil {
			return nil, fmt.Errorf("sds: SPIFFE validator: %w", err)
		}
		for _, t := range cfg.GetTrustDomains() {
			td, err := spiffeid.TrustDomainFromString(t.GetName())
			if err != nil {
				return nil, fmt.Errorf("sds: SPIFFE validator: %w", err)
			}
			roots, err := parseInlinePEM(t.GetTrustBundle())
			if err != nil {
				return nil, fmt.Errorf("sds: SPIFFE validator, trust domain %s: %w", td, err)
			}
			out[td] = roots
		}
	}
	return out, nil
}

func parseInlinePEM(ds *corev3.DataSource) ([]*x509.Certificate, error) {
	var b []byte
	switch {
	case ds.GetInlineBytes() != nil:
		b = ds.GetInlineBytes()
	case ds.GetInlineString() != "":
		b = []byte(ds.GetInlineString())
	default:
		return nil, errors.New("not inline")
	}
	return ca.ParseCertificatesPEM(b)
}

func workloadSecret(svid *agent.SVID) (*tlsv3.Secret, string, error) {
	sec := &tlsv3.Secret{
		Name: WorkloadCertName,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(svid.ChainPEM()),
			PrivateKey:       inline(svid.KeyPEM()),
		}},
	}
	return sec, svid.Serial.Text(16), nil
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
func (s *Server) build(w *agent.Handle, names []string) ([]resource, error) {
	var out []resource
	for _, name := range names {
		sec, version, err := s.secret(w, name)
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

// FetchSecrets answers one request with the current secrets.
func (s *Server) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	names, err := checkNames(req.GetTypeUrl(), req.GetResourceNames())
	if err != nil {
		return nil, err
	}
	var w *agent.Handle
	if slices.Contains(names, WorkloadCertName) {
		var err error
		if w, err = s.resolver.Resolve(ctx); err != nil {
			return nil, err
		}
		defer w.Release()
	}
	rs, err := s.build(w, names)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if len(rs) < len(names) {
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
func (s *Server) StreamSecrets(gs grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	s.streams.Add(1)
	defer s.streams.Add(-1)
	st, err := s.open(gs.Context())
	if err != nil {
		return err
	}
	defer st.close()

	// Guarded by st.mu: the handler writes names, pushes write the rest.
	var (
		names     []string
		lastNonce string
		sent      string // version of the last response
		force     bool   // answer even if the version was sent already
	)
	st.send = func() error {
		w, node := st.current()
		st.mu.Lock()
		want, was, again := names, sent, force
		force = false
		st.mu.Unlock()
		rs, err := s.build(w, want)
		if err != nil {
			s.log.Error("sds: building secrets", "node", node, "error", err)
			return status.Error(codes.Internal, "sds: cannot build secrets")
		}
		if len(rs) == 0 {
			return nil // nothing to serve yet; pushed when it arrives
		}
		v := versionOf(rs)
		if v == was && !again {
			return nil
		}
		resp := s.response(rs)
		if err := gs.Send(resp); err != nil {
			return err
		}
		st.mu.Lock()
		sent, lastNonce = v, resp.Nonce
		st.mu.Unlock()
		s.log.Debug("sds: pushed", "node", node, "resources", want, "version", v)
		return nil
	}
	return serve(st, gs.Recv, func(req *discoveryv3.DiscoveryRequest) error {
		st.setNode(req.GetNode())
		_, node := st.current()
		st.mu.Lock()
		nonce, held := lastNonce, names
		st.mu.Unlock()
		if n := req.GetResponseNonce(); n != "" && n != nonce {
			return nil // an answer to an older response: superseded
		}
		if d := req.GetErrorDetail(); d != nil {
			// A NACK: Envoy keeps what it had. Sending the same again
			// would be refused again, so wait for a change.
			s.log.Warn("sds: proxy rejected secrets", "node", node, "resources", held, "error", d.GetMessage())
			return nil
		}
		want, err := checkNames(req.GetTypeUrl(), req.GetResourceNames())
		if err != nil {
			return err
		}
		if req.GetResponseNonce() != "" && slices.Equal(want, held) {
			return nil // ACK of what we sent
		}
		if err := st.need(want); err != nil {
			return err
		}
		st.mu.Lock()
		names, force = want, true // a new or changed subscription gets an answer
		st.mu.Unlock()
		st.kick()
		return nil
	})
}
