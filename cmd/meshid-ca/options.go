package main

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/distribute"
	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/nodeauth"
	"github.com/meshid/meshid/ca/peers"
	"github.com/meshid/meshid/ca/podcert"
	"github.com/meshid/meshid/ca/server"
)

// Where a CA's keys come from.
const (
	sourceDir    = "dir"
	sourceSecret = "secret"
	sourcePlugin = "plugin"
	sourceStep   = "step"

	authKubernetes  = "kubernetes"
	authTokenReview = "tokenreview"
	authJWKS        = "jwks"
)

// options are meshid-ca's flags. They are validated, and derived values
// filled in, in one place: complete.
type options struct {
	trustDomain string
	audiences   []string
	grpcAddr    string
	httpAddr    string
	plaintext   bool
	dnsNames    []string
	servingTTL  time.Duration

	caSource            string
	stateDir            string
	namespace           string
	secretName          string
	pluginDir           string
	caStore             string
	caKeyURI            string
	stepURL             string
	stepRootFile        string
	stepRoots           []*x509.Certificate
	stepProvisioner     string
	stepPassword        []byte
	stepPassFile        string
	pluginPoll          time.Duration
	keyType             string
	federationFile      string
	federationConfigMap string
	peers               []peers.Peer // from federationFile, by complete

	rootTTL         time.Duration
	intermediateTTL time.Duration

	defaultTTL time.Duration
	maxTTL     time.Duration

	auth                  string
	kubeconfig            string
	jwksFile              string
	jwksURL               string
	jwksCAFile            string
	tokenIssuer           string
	tokenCacheTTL         time.Duration
	tokenNegativeCacheTTL time.Duration
	tokenCacheSize        int
	kubeQPS               float32
	kubeBurst             int
	reviewQPS             float32
	reviewBurst           int
	reviewConcurrency     int

	rateLimit       float64
	rateBurst       int
	nsRateLimit     float64
	nsRateBurst     int
	globalRateLimit float64
	globalRateBurst int
	maxMessageBytes int
	logFormat       string
	logLevel        string
	profiling       bool
	gcPercent       int

	ledger          string
	ledgerDSN       string
	ledgerDSNFile   string
	ledgerRetention time.Duration
	ledgerDelay     time.Duration
	recordNothing   bool // benchmark builds only (benchflags.go)
	adminAddr       string
	adminIDs        []string
	adminSAs        []string
	nodeProxySAs    []string
	clusterID       string
	remoteSelector  string
	remoteBundles   bool
	nodeProxies     []nodeauth.Account
	denyRefresh     time.Duration
	bundleConfigMap string
	leaderLease     string
	caSync          time.Duration
	rootPropagation time.Duration
	podName         string
	bundleAddr      string
	bundleID        string

	podCertSigner      string
	podCertTrustBundle bool
	podCertRefresh     float64

	jwtKeys        string
	jwtKeysSecret  string
	jwtKeyRotation time.Duration
	jwtTTL         time.Duration
	jwtMaxTTL      time.Duration

	bundleSPIFFEID spiffeid.ID
	// Filled in by complete.
	td        spiffeid.TrustDomain
	algorithm keys.Algorithm
	level     slog.Level
	admins    []spiffeid.ID
}

// Ledger drivers.
const (
	ledgerSQLite   = "sqlite"
	ledgerPostgres = "postgres"
)

const inClusterNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

func (o *options) addFlags(fs *pflag.FlagSet) {
	addBenchFlags(fs, o)
	fs.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain of issued identities")
	fs.StringSliceVar(&o.audiences, "audiences", []string{"istio-ca"}, "token audiences accepted; a token for any other audience is refused")
	fs.StringVar(&o.grpcAddr, "grpc-addr", ":15012", "address of the gRPC certificate service")
	fs.StringVar(&o.httpAddr, "http-addr", ":15014", "address of /healthz, /readyz and /metrics")
	fs.BoolVar(&o.plaintext, "plaintext", false, "serve gRPC without TLS (tokens then cross the network in clear; only for tests behind a trusted proxy)")
	fs.StringSliceVar(&o.dnsNames, "serving-dns-names", nil, "DNS names (and IP addresses) of the CA's own TLS certificate (default: meshid-ca and its Service names in --namespace, istiod.istio-system.svc, localhost, 127.0.0.1, ::1)")
	fs.DurationVar(&o.servingTTL, "serving-cert-ttl", server.DefaultServingTTL, "lifetime of the CA's own TLS certificate; renewed at half")

	fs.StringVar(&o.caSource, "ca-source", sourceDir, "where the CA key lives: dir (state directory), secret (Kubernetes Secret), plugin (Istio cacerts files), or step (meshid makes the intermediate's key and smallstep's step-ca signs it, under step-ca's root; kept in --ca-store)")
	fs.StringVar(&o.caKeyURI, "ca-key-uri", "", "the signing intermediate's key in an HSM, as a PKCS#11 URI (pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=meshid;id=01;object=meshid-ca?pin-source=/etc/meshid/hsm/pin): made there if missing, never in meshid's memory or files, certified anew at each renewal; for every --ca-source")
	fs.StringVar(&o.caStore, "ca-store", "dir", "with --ca-source=step, where the intermediate and its key are kept: dir (--state-dir) or secret (--secret-name, which replicas share)")
	fs.StringVar(&o.stepURL, "step-ca-url", "", "with --ca-source=step, step-ca's address (https://host:port)")
	fs.StringVar(&o.stepRootFile, "step-root-file", "", "with --ca-source=step, step-ca's root certificate (PEM): trusted for step-ca's TLS and the mesh's root")
	fs.StringVar(&o.stepProvisioner, "step-provisioner", "meshid", "with --ca-source=step, the name of step-ca's JWK provisioner meshid uses (its X.509 template must allow a path-length-0 CA name constrained to the trust domain: deploy/step-ca.md)")
	fs.StringVar(&o.stepPassFile, "step-password-file", "", "with --ca-source=step, a file holding the provisioner's password (a mounted Secret)")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/meshid", "state directory for --ca-source=dir and --jwt-keys=dir; without an API server, meshid-ca also writes there what the trust bundle ConfigMaps would carry beside the roots, for agents on the machine ("+distribute.FederatedKey+", "+distribute.JWTKey+"); created with mode 0700")
	fs.StringVar(&o.namespace, "namespace", "", "the CA's namespace, for --ca-source=secret and the default DNS names (default: the pod's namespace, else meshid-system)")
	fs.StringVar(&o.secretName, "secret-name", "meshid-ca", "Secret holding the CA for --ca-source=secret")
	fs.StringVar(&o.pluginDir, "plugin-dir", "/etc/cacerts", "directory with ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem for --ca-source=plugin")
	fs.DurationVar(&o.pluginPoll, "plugin-poll-interval", 5*time.Second, "how often the plug-in directory is checked for changes")
	fs.StringVar(&o.keyType, "ca-key-type", string(keys.ECDSAP256), fmt.Sprintf("key type of a generated CA, one of %v", keys.Algorithms))
	fs.DurationVar(&o.rootTTL, "root-ttl", keys.DefaultRootTTL, "lifetime of a generated root")
	fs.DurationVar(&o.intermediateTTL, "intermediate-ttl", keys.DefaultIntermediateTTL, "lifetime of a generated signing intermediate")

	fs.DurationVar(&o.defaultTTL, "default-cert-ttl", ca.DefaultTTL, "workload certificate lifetime when the request asks for none")
	fs.DurationVar(&o.maxTTL, "max-cert-ttl", ca.DefaultMaxTTL, "longest workload certificate lifetime; longer requests are clamped")

	fs.StringVar(&o.auth, "auth", authKubernetes, "how tokens are checked: kubernetes (verify against the cluster's own keys and its watched pods and service accounts, TokenReview when that cannot decide), tokenreview (TokenReview for every token its claims and the cluster's keys do not refuse), or jwks (offline against a JWKS, no API server)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for the API server (default: in-cluster config)")
	fs.StringVar(&o.jwksFile, "jwks-file", "", "JWKS file of the service-account token issuer, for --auth=jwks")
	fs.StringVar(&o.jwksURL, "jwks-url", "", "JWKS URL of the service-account token issuer, for --auth=jwks")
	fs.StringVar(&o.jwksCAFile, "jwks-ca-file", "", "PEM roots to verify --jwks-url's TLS certificate (default: system roots)")
	fs.StringVar(&o.tokenIssuer, "token-issuer", "", "expected iss claim for --auth=jwks (the API server's --service-account-issuer)")
	fs.DurationVar(&o.tokenCacheTTL, "token-cache-ttl", 30*time.Second, "how long a successful token check is remembered (never past the token's expiry); bounds how late a deleted service account is noticed; 0 disables")
	fs.DurationVar(&o.tokenNegativeCacheTTL, "token-negative-cache-ttl", 10*time.Second, "how long a token the API server refused is remembered as refused, so a client repeating it costs one TokenReview; 0 disables")
	fs.IntVar(&o.tokenCacheSize, "token-cache-size", 10000, "most token checks remembered (accepted, and refused, each)")
	fs.IntVar(&o.reviewConcurrency, "token-review-concurrency", 32, "TokenReviews in flight at most; more wait, shared fairly between client addresses")
	fs.Float32Var(&o.reviewQPS, "token-review-qps", 1000, "TokenReviews per second at most, sustained (client-side; the API server's Priority and Fairness also applies)")
	fs.IntVar(&o.reviewBurst, "token-review-burst", 2000, "TokenReviews allowed at once above --token-review-qps")
	fs.Float32Var(&o.kubeQPS, "kube-api-qps", 50, "requests per second to the API server for everything but TokenReviews (watches, probes, ConfigMaps, the CA Secret, leases)")
	fs.IntVar(&o.kubeBurst, "kube-api-burst", 100, "requests allowed at once above --kube-api-qps")

	fs.StringVar(&o.ledger, "ledger", ledgerSQLite, "where every issued certificate is recorded before it is returned: sqlite (a file, one replica) or postgres (shared by replicas)")
	fs.StringVar(&o.ledgerDSN, "ledger-dsn", "", "sqlite: the database file (default <state-dir>/ledger.db); postgres: the connection URL (prefer --ledger-dsn-file: a URL with a password shows in the process list)")
	fs.StringVar(&o.ledgerDSNFile, "ledger-dsn-file", "", "file holding the postgres connection URL (a mounted Secret)")
	fs.DurationVar(&o.ledgerDelay, "ledger-commit-delay", ledger.DefaultCommitDelay, "under load, how long a commit of fewer than 32 records waits for more to share its fsync (each certificate is still returned only once recorded); 0 never waits")
	fs.DurationVar(&o.ledgerRetention, "ledger-retention", 30*24*time.Hour, "records of certificates expired longer ago than this are pruned (hourly); 0 keeps everything")
	fs.StringVar(&o.adminAddr, "admin-addr", ":15013", "address of the admin API (gRPC, TLS; meshidctl talks to it); served only when --admin-ids or --admin-service-accounts name someone; empty disables")
	fs.StringSliceVar(&o.adminIDs, "admin-ids", nil, "SPIFFE IDs whose client certificates (issued by this CA) may use the admin API")
	fs.StringSliceVar(&o.adminSAs, "admin-service-accounts", nil, "service accounts (namespace/name) whose tokens may use the admin API")
	fs.StringVar(&o.clusterID, "cluster-id", "Kubernetes", "this cluster's ID, as Istio names it (global.multiCluster.clusterName; Istio's agents send it as clusterid): callers naming it, or none, are checked against this cluster; recorded in the ledger")
	fs.StringVar(&o.remoteSelector, "remote-secret-selector", "", "label selector of the Secrets in --namespace that hold remote clusters' kubeconfigs, one per data key named by cluster ID, as istiod's remote secrets (e.g. istio/multiCluster=true); callers naming a remote cluster are checked against its API server (TokenReview), and callers naming a cluster no Secret holds are refused. Empty: one cluster")
	fs.BoolVar(&o.remoteBundles, "remote-bundle-configmaps", false, "also keep --bundle-configmap in every namespace of each remote cluster (the remote kubeconfig needs list/watch on namespaces and get/create/update on that ConfigMap there)")
	fs.StringSliceVar(&o.nodeProxySAs, "node-proxy-service-accounts", nil, "service accounts (namespace/name) of node proxies, e.g. istio-system/ztunnel (Istio ambient mode): their pods may ask for the certificate of any workload with a pod on their node (ImpersonatedIdentity); empty refuses every such request. Watches all pods")
	fs.DurationVar(&o.denyRefresh, "deny-refresh-interval", 2*time.Second, "how often denied identities are read again from the ledger (a deny made through another replica takes effect here within this)")
	fs.StringVar(&o.bundleConfigMap, "bundle-configmap", "istio-ca-root-cert", "ConfigMap (key root-cert.pem) the leader keeps in every namespace with the roots trusted now; empty disables. Needs the API server (not reached with --auth=jwks and --ca-source dir or plugin)")
	fs.DurationVar(&o.caSync, "ca-sync-interval", 30*time.Second, "how often the stored CA is re-read for changes made elsewhere (another replica's intermediate renewal, a root rotation step); a root rotation waits this long after each step")
	fs.DurationVar(&o.rootPropagation, "root-propagation", 2*time.Minute, "how long a root rotation waits after distributing a new root before signing with it: kubelets refresh mounted ConfigMaps about once a minute, plus their cache")
	fs.StringVar(&o.leaderLease, "leader-election-lease", "meshid-ca-leader", "Lease in --namespace through which one replica is elected for singleton work (the trust-bundle ConfigMaps)")
	fs.StringVar(&o.bundleAddr, "bundle-endpoint-addr", ":8443", "address of the SPIFFE bundle endpoint (HTTPS, SPIFFE authentication) other trust domains federate with; empty disables")
	fs.StringVar(&o.bundleID, "bundle-endpoint-id", "", "SPIFFE ID of the bundle endpoint's certificate (default spiffe://<trust-domain>/ns/<namespace>/sa/meshid-ca)")
	fs.StringVar(&o.federationFile, "federation-file", "", "YAML file of the trust domains to federate with, each's bundle fetched from its SPIFFE bundle endpoint and kept fresh (federatesWith: a list in the shape of SPIRE's ClusterFederatedTrustDomain spec: trustDomain, bundleEndpointURL, bundleEndpointProfile {type: https_web|https_spiffe, endpointSPIFFEID}, trustDomainBundle); empty: none")
	fs.StringVar(&o.federationConfigMap, "federation-configmap", "meshid-federated-bundles", "ConfigMap in --namespace where the last good bundle of each federated trust domain is kept across restarts and replicas; empty: not kept")
	fs.StringVar(&o.podCertSigner, "pod-certificate-signer", "", "sign Kubernetes PodCertificateRequests (certificates.k8s.io/v1beta1, Kubernetes 1.35+ with the PodCertificateRequest feature gate) for this signer name, e.g. "+podcert.DefaultSignerName+"; on the elected replica. Empty: off")
	fs.Float64Var(&o.podCertRefresh, "pod-certificate-refresh", 0.5, "with --pod-certificate-signer, how far into its lifetime the kubelet renews a pod certificate (beginRefreshAt), between 0 and 1; the API keeps it 10 minutes from either end")
	fs.BoolVar(&o.podCertTrustBundle, "pod-certificate-trust-bundle", true, "with --pod-certificate-signer, keep the roots in the signer's ClusterTrustBundle (<domain>:<path>:roots; needs the ClusterTrustBundle feature gate)")
	fs.StringVar(&o.jwtKeys, "jwt-keys", jwtKeysAuto, "where meshid-ca's JWT-SVID signing keys are kept: secret (--jwt-keys-secret, which replicas share), dir (--state-dir/"+jwtKeysFile+", one replica), none (no JWT-SVIDs), or auto: secret when meshid-ca talks to the API server, else dir")
	fs.StringVar(&o.jwtKeysSecret, "jwt-keys-secret", "meshid-ca-jwt-keys", "Secret in --namespace holding the JWT-SVID signing keys with --jwt-keys=secret; created on first start")
	fs.DurationVar(&o.jwtKeyRotation, "jwt-key-rotation", jwtsvid.DefaultRotation, "how long each JWT-SVID signing key signs; its successor is published half of that before it takes over")
	fs.DurationVar(&o.jwtTTL, "jwt-svid-ttl", jwtsvid.DefaultTTL, "lifetime of a JWT-SVID when the request names none (the Workload API names none)")
	fs.DurationVar(&o.jwtMaxTTL, "jwt-svid-max-ttl", jwtsvid.DefaultMaxTTL, "longest JWT-SVID lifetime granted; longer requests are clamped")
	fs.StringVar(&o.podName, "pod-name", "", "this replica's name in leader election (default: the host name, which is the pod's name)")
	fs.Float64Var(&o.rateLimit, "rate-limit", 20, "certificates per second per pod (the one the token is bound to; per identity for tokens bound to no pod), sustained; 0 disables")
	fs.IntVar(&o.rateBurst, "rate-burst", 200, "certificates per pod allowed at once above --rate-limit")
	fs.Float64Var(&o.nsRateLimit, "namespace-rate-limit", 100, "certificates per second per namespace, sustained; 0 disables")
	fs.IntVar(&o.nsRateBurst, "namespace-rate-burst", 20000, "certificates per namespace allowed at once above --namespace-rate-limit (a restart storm of that many pods is served at full speed)")
	fs.Float64Var(&o.globalRateLimit, "global-rate-limit", 500, "certificates per second for the whole CA, sustained: bounds how fast the ledger grows; 0 disables")
	fs.IntVar(&o.globalRateBurst, "global-rate-burst", 50000, "certificates allowed at once above --global-rate-limit")
	fs.IntVar(&o.maxMessageBytes, "max-message-bytes", server.DefaultMaxMessageBytes, "largest gRPC request accepted")
	fs.BoolVar(&o.profiling, "profiling", false, "serve Go's pprof profiles under /debug/pprof/ on --http-addr")
	fs.IntVar(&o.gcPercent, "gc-percent", 400, "Go garbage collector target (as GOGC, which overrides it when set); signing allocates much short-lived garbage and the live heap is small, so a higher target trades a little memory for throughput; set GOMEMLIMIT to cap memory")
	fs.StringVar(&o.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
}

// complete validates the flags and derives what the rest of main needs.
func (o *options) complete() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		bad("--trust-domain: %v", err)
	}
	o.td = td
	if o.federationFile != "" {
		data, err := os.ReadFile(o.federationFile)
		if err != nil {
			bad("--federation-file: %v", err)
		} else if o.peers, err = peers.ParseConfig(data, td); err != nil {
			bad("--federation-file %s: %v", o.federationFile, err)
		}
	}
	if len(o.audiences) == 0 {
		bad("--audiences must name at least one audience")
	}
	if o.gcPercent <= 0 {
		bad("--gc-percent must be positive, got %d", o.gcPercent)
	}
	for _, a := range o.audiences {
		if strings.TrimSpace(a) == "" {
			bad("--audiences must not contain an empty audience")
		}
	}
	if o.namespace == "" {
		o.namespace = "meshid-system"
		if b, err := os.ReadFile(inClusterNamespaceFile); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			o.namespace = strings.TrimSpace(string(b))
		}
	}
	if len(o.dnsNames) == 0 {
		o.dnsNames = []string{
			"meshid-ca",
			"meshid-ca." + o.namespace,
			"meshid-ca." + o.namespace + ".svc",
			"meshid-ca." + o.namespace + ".svc.cluster.local",
			"istiod.istio-system.svc",
			"istiod.istio-system.svc.cluster.local",
			"localhost",
			// For clients on the same machine that dial an address, not a
			// name (Istio's agent with CA_ADDR=127.0.0.1:15012, say).
			"127.0.0.1",
			"::1",
		}
	}
	if o.servingTTL < time.Minute {
		bad("--serving-cert-ttl must be at least 1m")
	}

	switch o.caSource {
	case sourceDir:
		if o.stateDir == "" {
			bad("--state-dir is required with --ca-source=dir")
		}
	case sourceSecret:
		if o.secretName == "" {
			bad("--secret-name is required with --ca-source=secret")
		}
	case sourceStep:
		switch o.caStore {
		case "dir":
			if o.stateDir == "" {
				bad("--state-dir is required with --ca-store=dir")
			}
		case "secret":
			if o.secretName == "" {
				bad("--secret-name is required with --ca-store=secret")
			}
		default:
			bad("--ca-store must be dir or secret, not %q", o.caStore)
		}
		if o.stepURL == "" || o.stepRootFile == "" || o.stepPassFile == "" || o.stepProvisioner == "" {
			bad("--ca-source=step needs --step-ca-url, --step-root-file, --step-provisioner and --step-password-file")
			break
		}
		if b, err := os.ReadFile(o.stepRootFile); err != nil {
			bad("--step-root-file: %v", err)
		} else if roots, err := ca.ParseCertificatesPEM(b); err != nil || !allSelfSignedCAs(roots) {
			bad("--step-root-file %s: want step-ca's root CA certificates (PEM; two while its root is rotated)", o.stepRootFile)
		} else {
			o.stepRoots = roots
		}
		if b, err := os.ReadFile(o.stepPassFile); err != nil {
			bad("--step-password-file: %v", err)
		} else if o.stepPassword = bytes.TrimRight(b, "\r\n"); len(o.stepPassword) == 0 {
			bad("--step-password-file %s is empty", o.stepPassFile)
		}
	case sourcePlugin:
		if o.pluginDir == "" {
			bad("--plugin-dir is required with --ca-source=plugin")
		}
		if o.pluginPoll <= 0 {
			bad("--plugin-poll-interval must be positive")
		}
	default:
		bad("--ca-source must be dir, secret, plugin or step, not %q", o.caSource)
	}
	if o.algorithm, err = keys.ParseAlgorithm(o.keyType); err != nil {
		bad("--ca-key-type: %v", err)
	}
	if o.rootTTL <= 0 || o.intermediateTTL <= 0 || o.intermediateTTL > o.rootTTL {
		bad("--root-ttl and --intermediate-ttl must be positive, the intermediate no longer than the root")
	}
	if o.defaultTTL <= 0 || o.maxTTL <= 0 || o.defaultTTL > o.maxTTL {
		bad("--default-cert-ttl and --max-cert-ttl must be positive, the default no longer than the max")
	}

	switch o.auth {
	case authKubernetes, authTokenReview:
		if o.jwksFile != "" || o.jwksURL != "" {
			bad("--jwks-file and --jwks-url need --auth=jwks")
		}
	case authJWKS:
		if (o.jwksFile == "") == (o.jwksURL == "") {
			bad("--auth=jwks needs exactly one of --jwks-file and --jwks-url")
		}
		if o.tokenIssuer == "" {
			bad("--auth=jwks needs --token-issuer")
		}
	default:
		bad("--auth must be kubernetes, tokenreview or jwks, not %q", o.auth)
	}
	if o.tokenCacheTTL < 0 || o.tokenNegativeCacheTTL < 0 || o.tokenCacheSize < 0 {
		bad("--token-cache-ttl, --token-negative-cache-ttl and --token-cache-size must not be negative")
	}
	if o.reviewConcurrency < 1 {
		bad("--token-review-concurrency must be at least 1")
	}
	if o.reviewQPS <= 0 || o.reviewBurst < 1 || o.kubeQPS <= 0 || o.kubeBurst < 1 {
		bad("--token-review-qps, --kube-api-qps must be positive and --token-review-burst, --kube-api-burst at least 1")
	}
	for _, l := range []struct {
		name  string
		rate  float64
		burst int
	}{{"--rate", o.rateLimit, o.rateBurst}, {"--namespace-rate", o.nsRateLimit, o.nsRateBurst}, {"--global-rate", o.globalRateLimit, o.globalRateBurst}} {
		if l.rate < 0 || (l.rate > 0 && l.burst < 1) {
			bad("%s-limit must not be negative, and %s-burst must be at least 1 when limiting", l.name, l.name)
		}
	}
	if o.maxMessageBytes < 4096 {
		bad("--max-message-bytes must be at least 4096")
	}
	switch o.ledger {
	case ledgerSQLite:
		if o.ledgerDSNFile != "" {
			bad("--ledger-dsn-file is for --ledger=postgres")
		}
		if o.ledgerDSN == "" {
			if o.stateDir == "" {
				bad("--ledger=sqlite needs --ledger-dsn or --state-dir")
			}
			o.ledgerDSN = filepath.Join(o.stateDir, "ledger.db")
		}
	case ledgerPostgres:
		if (o.ledgerDSN == "") == (o.ledgerDSNFile == "") {
			bad("--ledger=postgres needs exactly one of --ledger-dsn and --ledger-dsn-file")
		}
		if o.ledgerDSNFile != "" {
			b, err := os.ReadFile(o.ledgerDSNFile)
			if err != nil {
				bad("--ledger-dsn-file: %v", err)
			}
			o.ledgerDSN = strings.TrimSpace(string(b))
		}
	default:
		bad("--ledger must be sqlite or postgres, not %q", o.ledger)
	}
	if o.ledgerRetention < 0 {
		bad("--ledger-retention must not be negative")
	}
	if o.ledgerDelay < 0 || o.ledgerDelay > time.Second {
		bad("--ledger-commit-delay must be between 0 and 1s")
	}
	if o.denyRefresh < 100*time.Millisecond {
		bad("--deny-refresh-interval must be at least 100ms")
	}
	for _, raw := range o.adminIDs {
		id, err := spiffeid.FromString(raw)
		if err != nil {
			bad("--admin-ids: %q: %v", raw, err)
			continue
		}
		o.admins = append(o.admins, id)
	}
	for _, sa := range o.adminSAs {
		if ns, name, ok := strings.Cut(sa, "/"); !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			bad("--admin-service-accounts: %q is not namespace/name", sa)
		}
	}
	if o.clusterID == "" || len(o.clusterID) > 253 {
		bad("--cluster-id must be a name of 1 to 253 characters")
	}
	if o.remoteSelector != "" {
		if _, err := metav1.ParseToLabelSelector(o.remoteSelector); err != nil {
			bad("--remote-secret-selector: %v", err)
		}
	}
	if o.remoteBundles && (o.remoteSelector == "" || o.bundleConfigMap == "") {
		bad("--remote-bundle-configmaps needs --remote-secret-selector and --bundle-configmap")
	}
	if o.nodeProxies, err = nodeauth.ParseAccounts(o.nodeProxySAs); err != nil {
		bad("--node-proxy-service-accounts: %v", err)
	}
	if o.caSync <= 0 {
		bad("--ca-sync-interval must be positive")
	}
	if o.rootPropagation < 0 {
		bad("--root-propagation must not be negative")
	}
	if o.bundleConfigMap != "" && o.leaderLease == "" {
		bad("--bundle-configmap needs --leader-election-lease: only one replica may write the ConfigMaps")
	}
	if o.bundleAddr != "" && err == nil {
		if o.bundleID == "" {
			o.bundleSPIFFEID, err = spiffeid.FromSegments(td, "ns", o.namespace, "sa", "meshid-ca")
		} else {
			o.bundleSPIFFEID, err = spiffeid.FromString(o.bundleID)
			if err == nil && o.bundleSPIFFEID.TrustDomain() != td {
				err = fmt.Errorf("%s is not in trust domain %s", o.bundleSPIFFEID, td)
			}
		}
		if err != nil {
			bad("--bundle-endpoint-id: %v", err)
		}
	}
	if o.podCertSigner != "" {
		domain, path, ok := strings.Cut(o.podCertSigner, "/")
		switch {
		case !ok || domain == "" || path == "" || strings.ContainsAny(path, "/:") || strings.Contains(domain, ":"):
			bad("--pod-certificate-signer must be <domain>/<path>, like %s; not %q", podcert.DefaultSignerName, o.podCertSigner)
		case domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io"):
			bad("--pod-certificate-signer: signer names under kubernetes.io are Kubernetes' own")
		case o.bundleConfigMap == "":
			bad("--pod-certificate-signer runs on the replica elected with --bundle-configmap, which is empty")
		}
		if o.podCertRefresh <= 0 || o.podCertRefresh >= 1 {
			bad("--pod-certificate-refresh must be between 0 and 1, not %v", o.podCertRefresh)
		}
	}
	switch o.jwtKeys {
	case jwtKeysAuto:
		switch {
		case o.needsKube():
			o.jwtKeys = jwtKeysSecret
		case o.stateDir != "":
			o.jwtKeys = jwtKeysDir
		default:
			o.jwtKeys = jwtKeysNone
		}
	case jwtKeysSecret, jwtKeysDir, jwtKeysNone:
	default:
		bad("--jwt-keys must be auto, secret, dir or none, not %q", o.jwtKeys)
	}
	switch {
	case o.jwtKeys == jwtKeysSecret && o.jwtKeysSecret == "":
		bad("--jwt-keys-secret is required with --jwt-keys=secret")
	case o.jwtKeys == jwtKeysDir && o.stateDir == "":
		bad("--state-dir is required with --jwt-keys=dir")
	}
	if o.jwtKeys != jwtKeysNone {
		if _, err := jwtsvid.New(jwtsvid.Config{Store: &jwtsvid.File{}, Policy: o.jwtPolicy(), TTL: o.jwtTTL}); err != nil {
			bad("--jwt-key-rotation, --jwt-svid-ttl, --jwt-svid-max-ttl: %v", err)
		}
	}
	if o.podName == "" {
		if h, err := os.Hostname(); err == nil {
			o.podName = h
		}
	}
	switch o.logFormat {
	case "json", "text":
	default:
		bad("--log-format must be json or text")
	}
	if err := o.level.UnmarshalText([]byte(o.logLevel)); err != nil {
		bad("--log-level: %v", err)
	}
	return errors.Join(errs...)
}

// Where the JWT-SVID signing keys are kept (--jwt-keys).
const (
	jwtKeysAuto   = "auto"
	jwtKeysSecret = "secret"
	jwtKeysDir    = "dir"
	jwtKeysNone   = "none"
	jwtKeysFile   = "jwt-keys.json"
)

func (o *options) jwtPolicy() jwtsvid.Policy {
	return jwtsvid.Policy{Rotation: o.jwtKeyRotation, MaxTTL: o.jwtMaxTTL}
}

// needsKube says whether the API server must be reached.
func (o *options) needsKube() bool {
	return o.caSource == sourceSecret || (o.caSource == sourceStep && o.caStore == "secret") || o.auth != authJWKS || len(o.nodeProxySAs) > 0 || o.remoteSelector != "" || o.jwtKeys == jwtKeysSecret || o.podCertSigner != ""
}

func (o *options) limits() server.Limits {
	return server.Limits{
		Pod:       server.Limit{Rate: rate.Limit(o.rateLimit), Burst: o.rateBurst},
		Namespace: server.Limit{Rate: rate.Limit(o.nsRateLimit), Burst: o.nsRateBurst},
		Global:    server.Limit{Rate: rate.Limit(o.globalRateLimit), Burst: o.globalRateBurst},
	}
}

// serveAdmin says whether the admin API is served.
func (o *options) serveAdmin() bool {
	return o.adminAddr != "" && (len(o.admins) > 0 || len(o.adminSAs) > 0)
}

// allSelfSignedCAs says whether every certificate is a self-signed CA.
func allSelfSignedCAs(certs []*x509.Certificate) bool {
	for _, c := range certs {
		if !c.IsCA || c.CheckSignatureFrom(c) != nil {
			return false
		}
	}
	return len(certs) > 0
}
