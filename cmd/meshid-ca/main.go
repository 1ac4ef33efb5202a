// Command meshid-ca issues SPIFFE X.509 certificates to Kubernetes workloads
// over Istio's certificate API, after checking their service-account tokens.
package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"google.golang.org/grpc"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/admin"
	"github.com/meshid/meshid/ca/distribute"
	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/multicluster"
	"github.com/meshid/meshid/ca/nodeauth"
	"github.com/meshid/meshid/ca/peers"
	"github.com/meshid/meshid/ca/podcert"
	"github.com/meshid/meshid/ca/rotation"
	"github.com/meshid/meshid/ca/server"
	"github.com/meshid/meshid/ca/stepca"
	"github.com/meshid/meshid/internal/atomicfile"
	"github.com/meshid/meshid/internal/kubeconfig"
	"github.com/meshid/meshid/internal/logging"
	"github.com/meshid/meshid/internal/version"
)

func main() {
	var o options
	cmd := &cobra.Command{
		Use:   "meshid-ca",
		Short: "Issue SPIFFE certificates to Kubernetes workloads over Istio's certificate API",
		Long: `meshid-ca serves istio.v1.auth.IstioCertificateService/CreateCertificate.
It authenticates each caller by its Kubernetes service-account token (TokenReview,
or offline against the issuer's JWKS) and signs a short-lived certificate for
spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.`,
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
		fmt.Fprintln(os.Stderr, "meshid-ca:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o *options) error {
	log, err := logging.New(o.logFormat, o.level)
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), version.Collector("meshid_ca"))

	var (
		kube    kubernetes.Interface
		kubeCfg *rest.Config
	)
	if o.needsKube() {
		if kubeCfg, err = kubeconfig.Load(o.kubeconfig); err != nil {
			return err
		}
		kubeCfg.QPS, kubeCfg.Burst = o.kubeQPS, o.kubeBurst
		if kube, err = kubernetes.NewForConfig(kubeCfg); err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
	}

	authMetrics := k8sauth.NewMetrics(reg, "meshid_ca")
	local, objects, err := newAuthenticator(ctx, o, kube, kubeCfg, authMetrics, log)
	if err != nil {
		return err
	}
	var (
		nodePods    *nodeauth.Watcher
		nodeProxies *nodeauth.Clusters
	)
	if len(o.nodeProxies) > 0 {
		nodePods = nodeauth.Watch(ctx, kube, log)
		a, err := nodeauth.New(o.clusterID, o.td, o.nodeProxies, nodePods)
		if err != nil {
			return err
		}
		nodeProxies = nodeauth.NewClusters(o.clusterID)
		nodeProxies.Set(o.clusterID, a)
		log.Info("node proxies may ask for the workloads on their node", "service_accounts", o.nodeProxySAs)
	}
	router := &multicluster.Router{LocalID: o.clusterID, Local: local, Log: log}
	var remotes *multicluster.Remotes
	if o.remoteSelector != "" {
		if remotes, err = remoteClusters(ctx, o, kube, authMetrics, nodeProxies, log); err != nil {
			return err
		}
		router.Remotes = remotes
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshid_ca_remote_clusters",
			Help: "Remote clusters whose callers this CA authenticates (--remote-secret-selector).",
		}, func() float64 { return float64(len(remotes.Clusters())) }))
	}
	var authn k8sauth.Authenticator = router

	var issuers keys.Source
	metrics := server.NewMetrics(reg, &issuers)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshid_ca_intermediate_renewal_due_timestamp_seconds",
		Help: "When the signing intermediate is due for renewal (a third of its life, or of a CA above it short of the root, before it lapses), as a Unix time; 0 for a CA meshid does not renew (plug-in).",
	}, func() float64 {
		if at := issuers.RenewAt(); !at.IsZero() {
			return float64(at.Unix())
		}
		return 0
	}))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshid_ca_root_rotation_stage",
		Help: "Root rotation stage this replica signs at: 0 none, 1 prepared, 2 distributed, 3 switched.",
	}, func() float64 {
		return map[keys.Stage]float64{keys.StagePrepared: 1, keys.StageDistributed: 2, keys.StageSwitched: 3}[issuers.Stage()]
	}))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshid_ca_trusted_roots",
		Help: "Roots in the trust bundle this replica serves: 2 during a root rotation, 1 otherwise.",
	}, func() float64 {
		if is := issuers.Issuer(); is != nil {
			return float64(len(is.Roots()))
		}
		return 0
	}))

	authority, err := ca.New(ca.Config{Issuers: &issuers, DefaultTTL: o.defaultTTL, MaxTTL: o.maxTTL})
	if err != nil {
		return err
	}

	// Every certificate is recorded before it is returned: no ledger, no
	// CA.
	if o.ledger == ledgerSQLite {
		if err := os.MkdirAll(filepath.Dir(o.ledgerDSN), 0o700); err != nil {
			return fmt.Errorf("ledger: %w", err)
		}
	}
	delay := o.ledgerDelay
	if delay == 0 {
		delay = -1 // the flag's 0 means never; the ledger's means its default
	}
	led, err := ledger.Open(ctx, ledger.Config{Driver: o.ledger, DSN: o.ledgerDSN, CommitDelay: delay, Log: log})
	if err != nil {
		return fmt.Errorf("opening the %s ledger: %w", o.ledger, err)
	}
	defer led.Close()
	// Records over commits is how well group commits batch: near 1 under
	// load means every certificate pays for an fsync of its own.
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "meshid_ca_ledger_commits_total",
			Help: "Transactions that committed certificate records (group commits).",
		}, func() float64 { return float64(led.Stats().Commits) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "meshid_ca_ledger_records_total",
			Help: "Certificate records committed.",
		}, func() float64 { return float64(led.Stats().Records) }),
	)
	denyList := &admin.DenyList{}
	if err := denyList.Load(ctx, led); err != nil {
		return fmt.Errorf("reading denied identities: %w", err)
	}
	go denyList.Keep(ctx, led, o.denyRefresh, log)
	var prune func(context.Context)
	if o.ledgerRetention > 0 {
		prune = pruner(led, o.ledgerRetention, log, reg)
	}
	// Pruning is singleton work: the elected replica does it when replicas
	// elect one (below), else this process.
	elected := o.bundleConfigMap != "" && kube != nil
	if prune != nil && !elected {
		go prune(ctx)
	}

	svc, err := server.NewCertificateService(server.Config{
		Authority:   authority,
		Auth:        authn,
		TrustDomain: o.td,
		Limits:      o.limits(),
		Ledger:      issuanceRecorder(led, o.recordNothing),
		DenyList:    denyList,
		NodeProxies: nodeProxiesOrNil(nodeProxies),
		Metrics:     metrics,
		Log:         log,
	})
	if err != nil {
		return err
	}

	// --ca-key-uri: the intermediate's key stays in the HSM.
	var caKey *keys.External
	if o.caKeyURI != "" {
		k, err := keys.OpenKMSKey(ctx, o.caKeyURI, o.algorithm)
		if err != nil {
			return err
		}
		defer k.Close()
		caKey = &k.External
		log.Info("CA key in a KMS or HSM", "key", k.URI, "public_key_algorithm", fmt.Sprintf("%T", k.Signer.Public()))
	}
	// A plug-in CA that does not load is a configuration error: refuse to
	// start. Generated CAs in a Secret are retried until the API server
	// answers, with /readyz false meanwhile.
	if o.caSource == sourcePlugin {
		p := &keys.Plugin{Dir: o.pluginDir, Key: caKey}
		is, err := p.Load()
		if err != nil {
			return fmt.Errorf("plug-in CA in %s: %w", o.pluginDir, err)
		}
		issuers.Set(is)
		logIssuer(log, "plug-in CA loaded", is)
		go p.Watch(ctx, &issuers, o.pluginPoll, log, metrics.PluginReloaded)
	}
	// A CA meshid generated lives in a store: the state directory, or a
	// Secret the replicas share. Both renewal and root rotation write it.
	var store keys.Store
	var upstream *keys.UpstreamCA
	var renewState renewalState
	if o.caSource == sourceStep {
		client, err := stepca.New(stepca.Config{URL: o.stepURL, Roots: o.stepRoots, Provisioner: o.stepProvisioner, Password: o.stepPassword, TrustDomain: o.td})
		if err != nil {
			return err
		}
		upstream = &keys.UpstreamCA{Upstream: client, Roots: o.stepRoots, Propagation: o.rootPropagation, Since: time.Now(),
			TrustDomain: o.td, Algorithm: o.algorithm, TTL: o.intermediateTTL, Key: caKey}
		// A wrong password or provisioner stops the start; step-ca being
		// unreachable does not (a stored intermediate keeps signing).
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = client.Check(cctx)
		cancel()
		switch {
		case errors.Is(err, stepca.ErrConfig):
			return err
		case err != nil:
			log.Warn("step-ca not reached at start; a stored intermediate signs meanwhile", "error", err)
		}
	}
	if o.caSource == sourceDir || (o.caSource == sourceStep && o.caStore == "dir") {
		dir, err := keys.OpenStateDir(o.stateDir)
		if err != nil {
			return err
		}
		defer dir.Close()
		dir.Key = caKey
		store = dir
		r := renewer(o, dir, &issuers, o.caSync, log, reg, &renewState)
		r.Upstream = upstream
		m, is, err := loadGenerated(ctx, o, log, r, caKey, func(create func() (*keys.Material, error)) (*keys.Material, bool, error) {
			return dir.LoadOrCreate(create)
		})
		if err != nil {
			return err
		}
		issuers.Use(m, is)
		go r.Run(ctx, m)
		if upstream != nil {
			go watchStepRoots(ctx, o.stepRootFile, o.caSync, upstream, r, log)
		}
	}

	if o.caSource == sourceSecret || (o.caSource == sourceStep && o.caStore == "secret") {
		store = &keys.Secret{Client: kube.CoreV1(), Namespace: o.namespace, Name: o.secretName, Key: caKey}
	}
	var rotator *rotation.Rotator
	// Root rotation is meshid's only for a root it holds the key of; under
	// step-ca, step-ca's operators own the root.
	if store != nil && upstream == nil {
		var bundles rotation.Bundles
		if o.bundleConfigMap != "" && kube != nil {
			bundles = &distribute.ConfigMaps{Client: kube, Name: o.bundleConfigMap}
		}
		rotator, err = rotation.New(rotation.Config{
			Store: store, Source: &issuers, Algorithm: o.algorithm, RootTTL: o.rootTTL, IntermediateTTL: o.intermediateTTL,
			Ledger: led, Bundles: bundles, Sync: o.caSync, Propagation: o.rootPropagation, Log: log,
		})
		if err != nil {
			return err
		}
	}

	var tlsConfig *tls.Config
	serving := &server.ServingCertificate{Authority: authority, Issuers: &issuers, DNSNames: o.dnsNames, TTL: o.servingTTL}
	if o.plaintext {
		log.Warn("--plaintext: gRPC without TLS; service-account tokens cross the network in clear")
	} else {
		tlsConfig = server.TLSConfig(serving)
	}
	grpcServer, health := server.NewGRPCServer(svc, tlsConfig, o.maxMessageBytes)

	jwtKeys, err := newJWTKeys(o, kube, log)
	if err != nil {
		return err
	}
	jwtAuthorities := func() map[string]crypto.PublicKey { return nil }
	jwtBundle := func() []byte { return nil }
	if jwtKeys != nil {
		svc.JWT(jwtKeys).Register(grpcServer)
		jwtAuthorities = jwtKeys.Published
		jwtBundle = func() []byte {
			b := spiffebundle.New(o.td)
			for kid, key := range jwtKeys.Published() {
				b.AddJWTAuthority(kid, key)
			}
			if len(b.JWTAuthorities()) == 0 {
				return nil
			}
			data, err := peers.MarshalBundle(b)
			if err != nil {
				log.Error("encoding the JWT bundle failed", "error", err)
				return nil
			}
			return data
		}
		go func() {
			// MintJWTSVID answers Unavailable until the keys are loaded;
			// X.509 issuance does not wait for them.
			_, _, err := retry(ctx, log, "loading the JWT-SVID signing keys", func() (struct{}, bool, error) {
				return struct{}{}, true, jwtKeys.Sync(ctx)
			})
			if err != nil {
				return
			}
			log.Info("JWT-SVID signing keys loaded", "store", o.jwtKeys, "active_kid", jwtKeys.Active().ID, "published", len(jwtKeys.Published()))
			jwtKeys.Run(ctx, o.caSync)
		}()
	}

	started := time.Now()
	ready := func() error {
		if issuers.Issuer() == nil {
			return errors.New("CA keys not loaded")
		}
		// Not ready until pods and service accounts are listed, so a
		// replica that just started does not send a storm's tokens to
		// TokenReview; but no longer than objectsSyncWait, since the
		// reviews answer correctly meanwhile.
		if objects != nil && !objects.Synced() && time.Since(started) < objectsSyncWait {
			return errors.New("pods and service accounts not listed yet")
		}
		if remotes != nil && !remotes.Synced() && time.Since(started) < objectsSyncWait {
			return errors.New("remote cluster Secrets not listed yet")
		}
		if nodePods != nil && !nodePods.Synced() && time.Since(started) < objectsSyncWait {
			return errors.New("pods not listed yet for node proxies")
		}
		return nil
	}
	handler := server.NewHTTPHandler(reg, ready)
	if o.profiling {
		mux := http.NewServeMux()
		mux.Handle("/", handler)
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		handler = mux
	}
	httpServer := &http.Server{
		Addr:              o.httpAddr,
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
	}

	grpcLis, err := net.Listen("tcp", o.grpcAddr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", o.grpcAddr, err)
	}
	httpLis, err := net.Listen("tcp", o.httpAddr)
	if err != nil {
		grpcLis.Close()
		return fmt.Errorf("listen %s: %w", o.httpAddr, err)
	}
	errc := make(chan error, 4)
	go func() { errc <- grpcServer.Serve(grpcLis) }()
	go func() { errc <- httpServer.Serve(httpLis) }()

	var (
		federated        func() []byte                  // the peers' bundles for the agents, beside the roots
		federationStatus func(time.Time) []peers.Status // their state, for the admin API
	)
	if len(o.peers) > 0 {
		cfg := peers.Config{Peers: o.peers, Log: log.With("component", "federation"), Registerer: reg}
		if kube != nil && o.federationConfigMap != "" {
			cfg.Store = &peers.ConfigMapStore{Client: kube.CoreV1(), Namespace: o.namespace, Name: o.federationConfigMap}
		}
		set, err := peers.NewSet(cfg)
		if err != nil {
			return err
		}
		go set.Run(ctx)
		federated, federationStatus = set.ForAgents, set.Status
		log.Info("federating", "trust_domains", len(o.peers), "stored_in", o.federationConfigMap)
	}

	var adminServer *grpc.Server
	adminAddr := ""
	if o.serveAdmin() {
		adm, err := admin.New(admin.Config{
			JWTAuthorities: jwtAuthorities,
			Federation:     federationStatus,
			Ledger:         led,
			LedgerKind:     o.ledger,
			DenyList:       denyList,
			Issuers:        &issuers,
			Serving:        func() (*x509.Certificate, error) { c, err := serving.Certificate(); return leafOf(c), err },
			TrustDomain:    o.td,
			CASource:       o.caSource,
			Renewal:        func() (time.Time, error) { return issuers.RenewAt(), renewState.lastErr() },
			Admins:         &admin.Admins{IDs: o.admins, Issued: led, ServiceAccounts: o.adminSAs, Auth: authn},
			Rotator:        rotator,
			Log:            log,
		})
		if err != nil {
			return err
		}
		adminLis, err := net.Listen("tcp", o.adminAddr)
		if err != nil {
			grpcLis.Close()
			httpLis.Close()
			return fmt.Errorf("listen %s: %w", o.adminAddr, err)
		}
		adminAddr = adminLis.Addr().String()
		adminServer = admin.NewGRPCServer(adm, &issuers, serving.GetCertificate)
		go func() { errc <- adminServer.Serve(adminLis) }()
	} else if o.adminAddr != "" {
		log.Info("admin API not served: no --admin-ids or --admin-service-accounts")
	}

	// The roots trusted now, for the bundle endpoint and the ConfigMaps.
	roots := func() []*x509.Certificate {
		if is := issuers.Issuer(); is != nil {
			return is.Roots()
		}
		return nil
	}
	bundleAddr := ""
	if o.bundleAddr != "" {
		handler, err := federation.NewHandler(o.td, distribute.BundleSource{TrustDomain: o.td, Roots: roots, JWTAuthorities: jwtAuthorities})
		if err != nil {
			return err
		}
		svid := &server.ServingCertificate{Authority: authority, Issuers: &issuers, ID: o.bundleSPIFFEID, TTL: o.servingTTL}
		lis, err := net.Listen("tcp", o.bundleAddr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", o.bundleAddr, err)
		}
		bundleAddr = lis.Addr().String()
		bundleServer := distribute.NewEndpointServer(handler, svid.GetCertificate)
		go func() { errc <- bundleServer.ServeTLS(lis, "", "") }()
		defer bundleServer.Close()
	}

	if kube == nil && o.stateDir != "" {
		// No ConfigMaps without an API server: agents on this machine read
		// what the ConfigMaps would carry beside the roots from the state
		// directory.
		go keepTrustFiles(ctx, o.stateDir, map[string]func() []byte{
			distribute.FederatedKey: func() []byte {
				if federated == nil {
					return nil
				}
				return federated()
			},
			distribute.JWTKey: jwtBundle,
		}, log)
	}
	switch {
	case o.bundleConfigMap == "":
	case kube == nil:
		log.Info("trust bundle not distributed: meshid-ca talks to no API server (--auth=jwks with --ca-source dir or plugin)")
	default:
		leading := prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshid_ca_leader",
			Help: "1 while this replica is elected for singleton work (the trust-bundle ConfigMaps).",
		})
		reg.MustRegister(leading)
		leader := &distribute.Leader{Client: kube, Namespace: o.namespace, Lease: o.leaderLease, Identity: o.podName, Log: log,
			OnChange: func(b bool) { leading.Set(map[bool]float64{true: 1}[b]) }}
		cms := &distribute.ConfigMaps{Client: kube, Name: o.bundleConfigMap, Log: log, Roots: roots, Federated: federated, JWT: jwtBundle}
		leaderDone := make(chan struct{})
		go func() {
			defer close(leaderDone)
			leader.Run(ctx, func(ctx context.Context) {
				if prune != nil {
					go prune(ctx)
				}
				if o.podCertSigner != "" {
					startPodCertificates(ctx, o, kube, svc, authority, roots, log)
				}
				if o.remoteBundles {
					remotes.Each(ctx, func(ctx context.Context, id string, client kubernetes.Interface) {
						log := log.With("cluster", id)
						remote := &distribute.ConfigMaps{Client: client, Name: o.bundleConfigMap, Log: log, Roots: roots, Federated: federated, JWT: jwtBundle}
						if err := remote.Run(ctx); err != nil && ctx.Err() == nil {
							log.Error("distributing the trust bundle to a remote cluster failed", "error", err)
						}
					})
				}
				if err := cms.Run(ctx); err != nil {
					log.Error("distributing the trust bundle failed", "error", err)
				}
			})
		}()
		// On the way out, let the elector give the Lease up, so another
		// replica takes over at once instead of when it expires.
		defer func() {
			select {
			case <-leaderDone:
			case <-time.After(5 * time.Second):
			}
		}()
	}

	if secret, ok := store.(*keys.Secret); ok {
		go func() {
			// Replicas share the Secret: each also reads it every
			// --ca-sync-interval for another one's renewal or rotation step.
			r := renewer(o, secret, &issuers, o.caSync, log, reg, &renewState)
			r.Upstream = upstream
			m, is, err := loadGenerated(ctx, o, log, r, caKey, func(create func() (*keys.Material, error)) (*keys.Material, bool, error) {
				return retry(ctx, log, "loading the CA from its Secret", func() (*keys.Material, bool, error) {
					return secret.LoadOrCreate(ctx, create)
				})
			})
			if err != nil {
				errc <- err
				return
			}
			issuers.Use(m, is)
			go r.Run(ctx, m)
			if upstream != nil {
				go watchStepRoots(ctx, o.stepRootFile, o.caSync, upstream, r, log)
			}
			server.SetServing(health, true)
			log.Info("meshid-ca ready", "version", version.Version, "revision", version.Revision())
		}()
	} else {
		server.SetServing(health, true)
	}
	log.Info("meshid-ca serving",
		"grpc_addr", grpcLis.Addr().String(), "http_addr", httpLis.Addr().String(), "admin_addr", adminAddr, "bundle_endpoint_addr", bundleAddr,
		"ledger", o.ledger,
		"tls", !o.plaintext, "trust_domain", o.td.String(), "auth", o.auth, "ca_source", o.caSource)

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err = <-errc:
		log.Error("server stopped", "error", err)
	}
	server.SetServing(health, false)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stopped := make(chan struct{})
	go func() {
		grpcServer.GracefulStop()
		if adminServer != nil {
			adminServer.GracefulStop()
		}
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-shutdownCtx.Done():
		grpcServer.Stop()
		if adminServer != nil {
			adminServer.Stop()
		}
	}
	httpServer.Shutdown(shutdownCtx)
	return err
}

// renewer replaces the signing intermediate of a CA meshid generated (it
// holds the root key) before it lapses.
// renewalState remembers how the last intermediate renewal went, for the
// admin API's status (meshidctl check).
type renewalState struct {
	last atomic.Pointer[error]
}

func (s *renewalState) set(err error) { s.last.Store(&err) }

func (s *renewalState) lastErr() error {
	if p := s.last.Load(); p != nil {
		return *p
	}
	return nil
}

func renewer(o *options, store keys.Store, issuers *keys.Source, follow time.Duration, log *slog.Logger, reg prometheus.Registerer, state *renewalState) *keys.Renewer {
	renewals := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "meshid_ca_intermediate_renewals_total",
		Help: "Renewals of the signing intermediate (a third of its lifetime before it lapses), by result.",
	}, []string{"result"})
	reg.MustRegister(renewals)
	return &keys.Renewer{Store: store, Source: issuers, Algorithm: o.algorithm, TTL: o.intermediateTTL, Follow: follow, Log: log,
		Renewed: func(err error) {
			state.set(err)
			if err != nil {
				renewals.WithLabelValues("error").Inc()
				return
			}
			renewals.WithLabelValues("ok").Inc()
		}}
}

// pruner returns the loop that deletes, at its start and hourly until ctx
// ends, the records of certificates expired longer ago than retention.
func pruner(led *ledger.Ledger, retention time.Duration, log *slog.Logger, reg prometheus.Registerer) func(context.Context) {
	pruned := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "meshid_ca_ledger_pruned_total",
		Help: "Ledger records deleted because their certificate expired more than --ledger-retention ago.",
	})
	reg.MustRegister(pruned)
	return func(ctx context.Context) { pruneLedger(ctx, led, retention, pruned, log) }
}

func pruneLedger(ctx context.Context, led *ledger.Ledger, retention time.Duration, pruned prometheus.Counter, log *slog.Logger) {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		n, err := led.Prune(ctx, time.Now().Add(-retention))
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("pruning the ledger failed; retrying in an hour", "error", err)
		case n > 0:
			pruned.Add(float64(n))
			log.Info("ledger pruned", "records", n, "expired_before", time.Now().Add(-retention).UTC())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func leafOf(c *tls.Certificate) *x509.Certificate {
	if c == nil {
		return nil
	}
	return c.Leaf
}

// loadGenerated loads a CA meshid generates itself, creating it on first
// start through loadOrCreate.
//
// An intermediate found due for renewal (or expired, after a long stop) is
// renewed by r before anything is signed with it.
func loadGenerated(ctx context.Context, o *options, log *slog.Logger, r *keys.Renewer, caKey *keys.External, loadOrCreate func(func() (*keys.Material, error)) (*keys.Material, bool, error)) (*keys.Material, *ca.Issuer, error) {
	create := func() (*keys.Material, error) {
		return keys.Generate(keys.Options{
			TrustDomain:     o.td.String(),
			Algorithm:       o.algorithm,
			RootTTL:         o.rootTTL,
			IntermediateTTL: o.intermediateTTL,
			CAKey:           caKey,
		})
	}
	if r.Upstream != nil {
		create = func() (*keys.Material, error) { return r.Upstream.Intermediate(ctx, time.Now(), nil) }
	}
	m, created, err := loadOrCreate(create)
	if err != nil {
		return nil, nil, err
	}
	if r.Upstream != nil {
		// The bundle is --step-root-file's roots, plus the stored
		// intermediate's own root if the file lacks it (taken out too
		// early: dropping it would break every workload).
		bundle := r.Upstream.Bundle(m)
		if len(bundle) > len(o.stepRoots) {
			log.Warn("--step-root-file lacks the root the current intermediate chains to; it stays in the bundle until the intermediate is replaced",
				"root_fingerprint", ca.Fingerprint(bundle[len(bundle)-1]))
		}
		withBundle := *m
		withBundle.Roots = bundle
		m = &withBundle
	}
	msg := "CA loaded"
	switch {
	case created && r.Upstream != nil:
		msg = "CA intermediate signed by step-ca"
	case created:
		msg = "CA generated"
	}
	root := m.RootCert
	if root == nil {
		root = m.Roots[len(m.Roots)-1]
	}
	log.Info(msg, "root_rotation", m.RotationStage(), "trusted_roots", len(m.Roots),
		"root_fingerprint", ca.Fingerprint(root), "root_not_after", root.NotAfter.UTC(),
		"ca_fingerprint", ca.Fingerprint(m.CACert), "ca_not_after", m.CACert.NotAfter.UTC(),
		"key", keyDescription(m.CACert))
	if (m.RootKey != nil || r.Upstream != nil) && !time.Now().Before(m.RenewAt()) {
		if m, err = r.Check(ctx, m); err != nil {
			return nil, nil, err
		}
	}
	is, err := m.Issuer(time.Now())
	if err != nil {
		return nil, nil, err
	}
	return m, is, nil
}

func logIssuer(log *slog.Logger, msg string, is *ca.Issuer) {
	log.Info(msg,
		"root_fingerprint", ca.Fingerprint(is.Root()), "root_not_after", is.Root().NotAfter.UTC(),
		"ca_fingerprint", is.Fingerprint(), "ca_not_after", is.Certificate().NotAfter.UTC(),
		"key", keyDescription(is.Certificate()))
}

func keyDescription(c *x509.Certificate) string {
	return c.PublicKeyAlgorithm.String()
}

func retry[T any](ctx context.Context, log *slog.Logger, what string, f func() (T, bool, error)) (T, bool, error) {
	backoff := 500 * time.Millisecond
	for {
		v, ok, err := f()
		if err == nil {
			return v, ok, nil
		}
		log.Warn(what+" failed; retrying", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return v, false, fmt.Errorf("%s: %w", what, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// startPodCertificates runs the PodCertificateRequest signer and its
// ClusterTrustBundle on the elected replica, until ctx ends.
func startPodCertificates(ctx context.Context, o *options, kube kubernetes.Interface, svc *server.CertificateService, authority *ca.Authority, roots func() []*x509.Certificate, log *slog.Logger) {
	log = log.With("component", "pod-certificates", "signer", o.podCertSigner)
	signer := &podcert.Signer{Client: kube, Name: o.podCertSigner, Issuer: svc, MaxTTL: o.maxTTL, Backdate: authority.Backdate(), RefreshFraction: o.podCertRefresh, Log: log}
	go func() {
		if err := signer.Run(ctx); err != nil && ctx.Err() == nil {
			log.Error("the pod-certificate signer stopped", "error", err)
		}
	}()
	if o.podCertTrustBundle {
		tb := &podcert.TrustBundle{Client: kube, SignerName: o.podCertSigner, Roots: roots, Log: log}
		go tb.Run(ctx)
	}
}

// keepTrustFiles keeps a file in dir for each of files, rewritten when its
// content changes and removed while it has none, until ctx ends.
func keepTrustFiles(ctx context.Context, dir string, files map[string]func() []byte, log *slog.Logger) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		log.Error("trust bundle files not written", "error", err)
		return
	}
	written := map[string][]byte{}
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for first := true; ; first = false {
		for name, content := range files {
			data, path := content(), filepath.Join(dir, name)
			if old, ok := written[name]; ok && bytes.Equal(old, data) {
				continue
			}
			var err error
			if len(data) == 0 {
				if err = os.Remove(path); errors.Is(err, os.ErrNotExist) {
					err = nil
				}
			} else {
				err = atomicfile.Write(path, data, 0o644)
			}
			if err != nil {
				log.Error("writing a trust bundle file failed", "file", path, "error", err)
				continue
			}
			if !first || len(data) > 0 {
				log.Info("trust bundle file written", "file", path, "bytes", len(data))
			}
			written[name] = data
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// newJWTKeys makes the JWT-SVID signing keys in the store --jwt-keys
// names; nil with --jwt-keys=none.
func newJWTKeys(o *options, kube kubernetes.Interface, log *slog.Logger) (*jwtsvid.Keys, error) {
	var store jwtsvid.Store
	switch o.jwtKeys {
	case jwtKeysNone:
		log.Info("JWT-SVIDs not issued (--jwt-keys=none)")
		return nil, nil
	case jwtKeysSecret:
		store = &jwtsvid.Secret{Client: kube.CoreV1(), Namespace: o.namespace, Name: o.jwtKeysSecret}
	case jwtKeysDir:
		if err := os.MkdirAll(o.stateDir, 0o700); err != nil {
			return nil, fmt.Errorf("--state-dir: %w", err)
		}
		store = &jwtsvid.File{Path: filepath.Join(o.stateDir, jwtKeysFile)}
	}
	return jwtsvid.New(jwtsvid.Config{Store: store, Policy: o.jwtPolicy(), TTL: o.jwtTTL, Log: log.With("component", "jwt-keys")})
}

// newAuthenticator builds how tokens are checked (--auth), behind the token
// cache. In the cluster modes, what a token's claims or the cluster's own
// keys condemn is refused without asking the API server; TokenReviews go
// out --token-review-concurrency at a time, shared fairly between clients,
// on a client of their own (--token-review-qps) so a storm of reviews does
// not hold up the watches and probes the offline checks depend on.
//
// It also returns the watched objects (--auth=kubernetes), nil otherwise.
func newAuthenticator(ctx context.Context, o *options, kube kubernetes.Interface, cfg *rest.Config, metrics *k8sauth.Metrics, log *slog.Logger) (k8sauth.Authenticator, *k8sauth.Objects, error) {
	var (
		authn   k8sauth.Authenticator
		objects *k8sauth.Objects
	)
	switch o.auth {
	case authKubernetes, authTokenReview:
		k, err := clusterAuthenticator(ctx, o, kube, cfg, metrics, log)
		if err != nil {
			return nil, nil, err
		}
		if o.auth == authKubernetes {
			md, err := metadata.NewForConfig(cfg)
			if err != nil {
				return nil, nil, fmt.Errorf("kubernetes metadata client: %w", err)
			}
			objects = k8sauth.WatchObjects(ctx, md, kube.Discovery().RESTClient(), metrics, log)
			k.Objects = objects
		}
		authn = k
	case authJWKS:
		var ks *k8sauth.KeySet
		if o.jwksFile != "" {
			ks = k8sauth.NewFileKeySet(o.jwksFile)
		} else {
			client, err := jwksHTTPClient(o.jwksCAFile)
			if err != nil {
				return nil, nil, err
			}
			ks = k8sauth.NewURLKeySet(o.jwksURL, client)
		}
		if err := ks.Load(ctx); err != nil {
			return nil, nil, err
		}
		authn = &k8sauth.JWKS{Issuer: o.tokenIssuer, Audiences: o.audiences, Keys: ks, Leeway: 30 * time.Second}
	}
	return tokenCache(o, authn, metrics), objects, nil
}

func tokenCache(o *options, authn k8sauth.Authenticator, metrics *k8sauth.Metrics) *k8sauth.Cache {
	return k8sauth.NewCache(authn, k8sauth.CacheConfig{
		TTL: o.tokenCacheTTL, NegativeTTL: o.tokenNegativeCacheTTL, Size: o.tokenCacheSize, Metrics: metrics,
	})
}

// clusterAuthenticator checks tokens of the cluster cfg reaches: what the
// claims or the cluster's keys condemn is refused here, the rest goes to a
// TokenReview (--token-review-*), shared fairly between clients.
func clusterAuthenticator(ctx context.Context, o *options, kube kubernetes.Interface, cfg *rest.Config, metrics *k8sauth.Metrics, log *slog.Logger) (*k8sauth.Kubernetes, error) {
	reviewCfg := rest.CopyConfig(cfg)
	reviewCfg.QPS, reviewCfg.Burst = o.reviewQPS, o.reviewBurst
	reviews, err := kubernetes.NewForConfig(reviewCfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	review := &k8sauth.Fair{
		Auth:        &k8sauth.TokenReview{Client: reviews.AuthenticationV1(), Audiences: o.audiences, Metrics: metrics},
		Concurrency: o.reviewConcurrency,
		PerPeer:     reviewQueuePerPeer,
		Metrics:     metrics,
	}
	disc := k8sauth.NewDiscovery(kube.Discovery().RESTClient())
	disc.Start(ctx, log)
	return &k8sauth.Kubernetes{Audiences: o.audiences, Issuer: disc.Issuer, Keys: disc, Review: review, Metrics: metrics}, nil
}

// remoteClusters watches --remote-secret-selector's Secrets; each remote
// cluster's tokens are checked as --auth=tokenreview checks them (its keys,
// then a TokenReview on its API server), behind a token cache of its own.
func remoteClusters(ctx context.Context, o *options, kube kubernetes.Interface, metrics *k8sauth.Metrics, nodeProxies *nodeauth.Clusters, log *slog.Logger) (*multicluster.Remotes, error) {
	build := func(ctx context.Context, id string, cfg *rest.Config) (k8sauth.Authenticator, error) {
		cfg.QPS, cfg.Burst = o.kubeQPS, o.kubeBurst
		client, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		k, err := clusterAuthenticator(ctx, o, client, cfg, metrics, log.With("cluster", id))
		if err != nil {
			return nil, err
		}
		if nodeProxies != nil {
			// The remote cluster's node proxies, against its own pods.
			a, err := nodeauth.New(id, o.td, o.nodeProxies, nodeauth.Watch(ctx, client, log.With("cluster", id)))
			if err != nil {
				return nil, err
			}
			nodeProxies.Set(id, a)
			context.AfterFunc(ctx, func() { nodeProxies.Remove(id, a) })
		}
		return tokenCache(o, k, metrics), nil
	}
	return multicluster.Watch(ctx, kube, o.namespace, o.remoteSelector, o.clusterID, build, log)
}

// objectsSyncWait is how long /readyz waits for the first lists of pods and
// service accounts (--auth=kubernetes).
const objectsSyncWait = 30 * time.Second

// reviewQueuePerPeer bounds the TokenReviews one client address may have
// waiting; more are refused as Unavailable (Istio's agent retries them).
const reviewQueuePerPeer = 256

func jwksHTTPClient(caFile string) (*http.Client, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	if caFile != "" {
		pemData, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--jwks-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemData) {
			return nil, fmt.Errorf("--jwks-ca-file: no PEM certificate in %s", caFile)
		}
		t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: t, Timeout: 10 * time.Second}, nil
}

// watchStepRoots reads --step-root-file every interval and, when its roots
// change (step-ca's operators add the next root, or retire the old one),
// serves the new bundle; a root added restarts the propagation clock
// before an intermediate under it is used.
func watchStepRoots(ctx context.Context, path string, interval time.Duration, up *keys.UpstreamCA, r *keys.Renewer, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	warned := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		b, err := os.ReadFile(path)
		var roots []*x509.Certificate
		if err == nil {
			roots, err = ca.ParseCertificatesPEM(b)
		}
		if err == nil && !allSelfSignedCAs(roots) {
			err = errors.New("not only self-signed CA certificates")
		}
		if err != nil {
			if msg := err.Error(); msg != warned {
				log.Warn("--step-root-file does not load; the roots read before stay", "path", path, "error", err)
				warned = msg
			}
			continue
		}
		warned = ""
		if up.SetRoots(roots, time.Now()) {
			log.Info("--step-root-file changed; serving its roots", "roots", len(roots))
			r.Rebundle()
		}
	}
}

// nodeProxiesOrNil keeps a nil *nodeauth.Clusters from becoming a non-nil
// server.NodeProxies (which would answer every impersonation with a
// lookup instead of "not enabled").
func nodeProxiesOrNil(c *nodeauth.Clusters) server.NodeProxies {
	if c == nil {
		return nil
	}
	return c
}
