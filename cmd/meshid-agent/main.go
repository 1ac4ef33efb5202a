// Command meshid-agent gets a workload's certificates from meshid-ca and
// serves them over Envoy SDS, the SPIFFE Workload API and files, rotating
// them automatically.
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"k8s.io/client-go/kubernetes"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/agent/workloadapi"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/internal/kubeconfig"
	"github.com/meshid/meshid/internal/logging"
	"github.com/meshid/meshid/internal/version"
	"github.com/meshid/meshid/sds"
)

func main() {
	var o options
	cmd := &cobra.Command{
		Use:   "meshid-agent",
		Short: "Serve a workload's SPIFFE certificates over Envoy SDS, the Workload API and files",
		Long: `meshid-agent makes the workload's key on this machine, asks meshid-ca for a
certificate with the pod's service-account token, and serves it to Envoy (SDS)
and SPIFFE-aware applications (Workload API), renewing it at half life.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.complete(); err != nil {
				return err
			}
			if _, set := os.LookupEnv("GOGC"); !set {
				debug.SetGCPercent(o.gcPercent)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return run(ctx, &o)
		},
	}
	o.addFlags(cmd.Flags())
	if err := cmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "meshid-agent:", err)
		os.Exit(1)
	}
}

func readRoots(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--ca-root-file: %w", err)
	}
	roots, err := ca.ParseCertificatesPEM(b)
	if err != nil {
		return nil, fmt.Errorf("--ca-root-file %s: %w", path, err)
	}
	return roots, nil
}

func run(ctx context.Context, o *options) error {
	log, err := logging.New(o.logFormat, o.level)
	if err != nil {
		return err
	}

	roots, err := readRoots(o.caRootFile)
	if err != nil {
		return err
	}
	bundle := agent.NewBundle(o.td, roots)
	// The CA is verified against the bundle as watchTrust reloads it, so
	// that reconnecting after a root rotation trusts the new root.
	conn, err := agent.DialCA(o.caAddr, bundle.Roots, o.caServerName)
	if err != nil {
		return err
	}
	defer conn.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), version.Collector("meshid_agent"))
	metrics := agent.NewMetrics(reg)
	caClient := agent.NewCAClient(conn, o.clusterID)
	m, err := agent.NewManager(agent.Config{
		Signer:         caClient,
		JWT:            caClient,
		KeyType:        o.kt,
		TTL:            o.certTTL,
		Rotation:       agent.Rotation{Fraction: 0.5, Jitter: o.rotationJitter},
		RequestTimeout: o.requestTimeout,
		Log:            log,
		Observer:       metrics,
		Now:            o.clock(ctx),
	})
	if err != nil {
		return err
	}
	defer m.Close()
	var (
		resolver interface {
			Resolve(context.Context) (*agent.Handle, error)
		}
		self *agent.Handle // pod mode: the pod's own identity
	)
	if o.mode == modePod {
		pod := agent.Pod{Manager: m, ID: o.id, Tokens: agent.TokenFile(o.tokenFile)}
		// Held for as long as the agent runs, so the certificate is ready
		// before the first proxy asks.
		self = m.Acquire(o.id, pod.Tokens)
		defer self.Release()
		resolver = pod
	} else {
		authn, err := nodeAuthenticator(ctx, o, k8sauth.NewMetrics(reg, "meshid_agent"), log)
		if err != nil {
			return err
		}
		resolver = agent.Node{Manager: m, Auth: authn, TrustDomain: o.td}
	}

	sdsServer := sds.New(resolver, bundle, log)
	wlServer := workloadapi.New(o.td, resolver, bundle, log)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshid_agent_sds_streams", Help: "Open SDS streams.",
	}, func() float64 { return float64(sdsServer.OpenStreams()) }))

	errc := make(chan error, 4)
	var servers []*grpc.Server
	serve := func(path string, register ...func(*grpc.Server)) error {
		lis, err := sds.Listen(path, fs.FileMode(o.socketMode))
		if err != nil {
			return err
		}
		g := grpc.NewServer(sds.ServerOptions()...)
		for _, r := range register {
			r(g)
		}
		servers = append(servers, g)
		go func() { errc <- g.Serve(lis) }()
		log.Info("serving", "socket", path)
		return nil
	}
	if o.sdsSocket != "" {
		regs := []func(*grpc.Server){sdsServer.Register}
		if o.workloadAPISocket == "" {
			regs = append(regs, wlServer.Register)
		}
		if err := serve(o.sdsSocket, regs...); err != nil {
			return err
		}
	}
	if o.workloadAPISocket != "" {
		if err := serve(o.workloadAPISocket, wlServer.Register); err != nil {
			return err
		}
	}
	if o.outputDir != "" {
		if err := os.MkdirAll(o.outputDir, 0o750); err != nil {
			return fmt.Errorf("--output-dir: %w", err)
		}
		go agent.KeepFiles(ctx, self, o.outputDir, bundle.Roots, log)
	}
	trust := trustFiles{roots: o.caRootFile, federated: o.federatedFile, jwt: o.jwtBundleFile}
	trust.load(bundle, log, false)
	go trust.watch(ctx, bundle, log)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if self != nil && self.SVID() == nil {
			http.Error(w, "not ready: no certificate yet", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if o.profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	httpLis, err := net.Listen("tcp", o.httpAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", o.httpAddr, err)
	}
	httpServer := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { errc <- httpServer.Serve(httpLis) }()
	log.Info("meshid-agent started", "version", version.Version, "revision", version.Revision(), "mode", o.mode, "spiffe_id", o.id.String(), "ca_addr", o.caAddr, "http_addr", httpLis.Addr().String())

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err = <-errc:
		log.Error("server stopped", "error", err)
	}
	for _, g := range servers {
		g.Stop() // SDS streams are long-lived: do not wait for them
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	httpServer.Shutdown(shutdownCtx)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// trustFiles are where the trust bundle is read from: the roots and,
// unless empty, the federated bundles and the own JWT-SVID keys (keys of
// the trust bundle ConfigMap, mounted).
type trustFiles struct {
	roots, federated, jwt string
}

// load reads the files into bundle; the roots too when withRoots (they
// are read at start, before anything can use them). A file that does not
// parse is logged and changes nothing.
func (f trustFiles) load(bundle *agent.Bundle, log *slog.Logger, withRoots bool) {
	if withRoots {
		if roots, err := readRoots(f.roots); err != nil {
			log.Warn("trust bundle not reloaded", "error", err)
		} else {
			bundle.Set(roots)
		}
	}
	if f.federated != "" {
		agent.LoadFederated(bundle, f.federated, log)
	}
	if f.jwt != "" {
		agent.LoadJWTBundle(bundle, f.jwt, log)
	}
}

// watch reloads the files every 5 s: kubelet updates a mounted ConfigMap
// in place, within a minute of its change.
func (f trustFiles) watch(ctx context.Context, bundle *agent.Bundle, log *slog.Logger) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f.load(bundle, log, true)
	}
}

// nodeAuthenticator checks the tokens proxies present on their streams.
// What a token's claims or the cluster's keys condemn is refused here; the
// rest is reviewed, --token-review-concurrency at a time shared fairly
// between the processes connected, so one process sending junk cannot hold
// up the others' first certificates. A short cache spares reconnecting
// proxies a review each.
func nodeAuthenticator(ctx context.Context, o *options, metrics *k8sauth.Metrics, log *slog.Logger) (k8sauth.Authenticator, error) {
	var authn k8sauth.Authenticator
	switch o.auth {
	case "jwks":
		ks := k8sauth.NewFileKeySet(o.jwksFile)
		if err := ks.Load(ctx); err != nil {
			return nil, err
		}
		authn = &k8sauth.JWKS{Issuer: o.tokenIssuer, Audiences: o.audiences, Keys: ks, Leeway: 30 * time.Second}
	default:
		cfg, err := kubeconfig.Load(o.kubeconfig)
		if err != nil {
			return nil, err
		}
		cfg.QPS, cfg.Burst = o.kubeQPS, o.kubeBurst
		kube, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		disc := k8sauth.NewDiscovery(kube.Discovery().RESTClient())
		disc.Start(ctx, log)
		authn = &k8sauth.Kubernetes{
			Audiences: o.audiences, Issuer: disc.Issuer, Keys: disc, Metrics: metrics,
			Review: &k8sauth.Fair{
				Auth:        &k8sauth.TokenReview{Client: kube.AuthenticationV1(), Audiences: o.audiences, Metrics: metrics},
				Concurrency: o.reviewConcurrency,
				PerPeer:     64,
				Metrics:     metrics,
			},
		}
	}
	return k8sauth.NewCache(authn, k8sauth.CacheConfig{TTL: 30 * time.Second, NegativeTTL: 10 * time.Second, Size: 10000, Metrics: metrics}), nil
}
