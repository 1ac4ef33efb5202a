package main

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/agent"
)

const (
	modePod  = "pod"
	modeNode = "node"
)

// options are meshid-agent's flags, validated in one place: complete.
type options struct {
	mode           string
	caAddr         string
	caRootFile     string
	federatedFile  string
	jwtBundleFile  string
	caServerName   string
	clusterID      string
	trustDomain    string
	namespace      string
	serviceAccount string
	tokenFile      string

	auth       string
	audiences  []string
	kubeconfig string
	kubeQPS    float32
	kubeBurst  int

	reviewConcurrency int
	jwksFile          string
	tokenIssuer       string

	sdsSocket         string
	workloadAPISocket string
	socketMode        octalMode
	outputDir         string
	httpAddr          string

	keyType        string
	certTTL        time.Duration
	rotationJitter float64
	requestTimeout time.Duration
	logFormat      string
	logLevel       string
	profiling      bool
	gcPercent      int

	testClockSkewFile string // meshid_testclock builds only

	// Filled in by complete.
	td    spiffeid.TrustDomain
	id    spiffeid.ID
	kt    agent.KeyType
	level slog.Level
}

func (o *options) addFlags(fs *pflag.FlagSet) {
	addTestClockFlags(fs, o)
	fs.StringVar(&o.mode, "mode", modePod, "pod: serve one workload's identity (--namespace, --service-account, --token-file); node: serve every proxy on the node, each stream the identity its own token proves")
	fs.StringVar(&o.auth, "auth", "tokenreview", "node mode: how stream tokens are checked: tokenreview (ask the API server) or jwks (offline, --jwks-file and --token-issuer)")
	fs.StringSliceVar(&o.audiences, "audiences", []string{"istio-ca"}, "node mode: audiences a stream token must carry")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "node mode with --auth=tokenreview: kubeconfig (default: in-cluster config)")
	fs.Float32Var(&o.kubeQPS, "kube-api-qps", 50, "node mode with --auth=tokenreview: requests per second to the API server at most (TokenReviews, issuer discovery)")
	fs.IntVar(&o.kubeBurst, "kube-api-burst", 100, "requests allowed at once above --kube-api-qps")
	fs.IntVar(&o.reviewConcurrency, "token-review-concurrency", 8, "node mode with --auth=tokenreview: TokenReviews in flight at most; more wait, shared fairly between the processes that connect")
	fs.StringVar(&o.jwksFile, "jwks-file", "", "node mode with --auth=jwks: the token issuer's JWKS file")
	fs.StringVar(&o.tokenIssuer, "token-issuer", "", "node mode with --auth=jwks: expected iss claim")
	fs.StringVar(&o.caAddr, "ca-addr", "meshid-ca.meshid-system.svc:15012", "meshid-ca's gRPC address (TLS)")
	fs.StringVar(&o.jwtBundleFile, "jwt-bundle-file", "", "the own trust domain's JWT-SVID keys: the "+agent.JWTBundleKey+" key meshid-ca adds to the trust bundle ConfigMap (a SPIFFE bundle); used by ValidateJWTSVID and served by FetchJWTBundles, reread every 5 s. Default: beside --ca-root-file; none: never read")
	fs.StringVar(&o.federatedFile, "federated-bundles-file", "", "the federated trust domains' bundles: the "+agent.FederatedBundlesKey+" key meshid-ca adds to the trust bundle ConfigMap while it federates (a missing file is no federation); served to workloads over SDS and the Workload API, reread every 5 s. Default: beside --ca-root-file; none: never read")
	fs.StringVar(&o.caRootFile, "ca-root-file", "./var/run/secrets/istio/root-cert.pem", "PEM roots the CA's certificate must chain to (the istio-ca-root-cert ConfigMap mount); also served as the trust bundle")
	fs.StringVar(&o.caServerName, "ca-server-name", "", "name the CA's certificate must carry (default: the host of --ca-addr)")
	fs.StringVar(&o.clusterID, "cluster-id", "Kubernetes", "cluster ID sent to the CA, as Istio's agent sends it")
	fs.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	fs.StringVar(&o.namespace, "namespace", "", "the pod's namespace (required)")
	fs.StringVar(&o.serviceAccount, "service-account", "", "the pod's service account (required)")
	fs.StringVar(&o.tokenFile, "token-file", "./var/run/secrets/tokens/istio-token", "projected service-account token (audience istio-ca), read again for every request")
	fs.StringVar(&o.sdsSocket, "sds-socket", "./var/run/secrets/workload-spiffe-uds/socket", "Unix socket for Envoy SDS and the SPIFFE Workload API (where Istio's proxy looks for an SDS server); empty disables")
	fs.StringVar(&o.workloadAPISocket, "workload-api-socket", "", "separate Unix socket for the SPIFFE Workload API (default: served on --sds-socket)")
	o.socketMode = 0o660
	fs.Var(&o.socketMode, "socket-mode", "permissions of the sockets, in octal (0600: this user only; 0660: also the proxy's group)")
	fs.StringVar(&o.outputDir, "output-dir", "", "also write cert-chain.pem, key.pem and root-cert.pem here, rewritten on rotation; empty disables")
	fs.StringVar(&o.httpAddr, "http-addr", "127.0.0.1:15019", "address of /healthz, /readyz and /metrics")
	fs.StringVar(&o.keyType, "key-type", string(agent.ECDSAP256), "workload key type: ecdsa-p256 or rsa-2048")
	fs.DurationVar(&o.certTTL, "cert-ttl", time.Hour, "certificate lifetime asked of the CA (it may clamp it)")
	fs.Float64Var(&o.rotationJitter, "rotation-jitter", 0.1, "renewal happens at half life ± this fraction of the lifetime")
	fs.DurationVar(&o.requestTimeout, "ca-timeout", 10*time.Second, "timeout of one certificate request")
	fs.IntVar(&o.gcPercent, "gc-percent", 50, "Go garbage collector target (as GOGC, which overrides it when set); a node agent runs on every node and allocates little between rotations, so a tighter target keeps its memory small for almost no CPU")
	fs.BoolVar(&o.profiling, "profiling", false, "serve Go's pprof profiles under /debug/pprof/ on --http-addr")
	fs.StringVar(&o.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
}

func (o *options) complete() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		bad("--trust-domain: %v", err)
	}
	o.td = td
	switch o.mode {
	case modePod:
		if o.namespace == "" || o.serviceAccount == "" {
			bad("--namespace and --service-account are required in pod mode (the pod's identity)")
		} else if err == nil {
			if o.id, err = spiffeid.FromSegments(td, "ns", o.namespace, "sa", o.serviceAccount); err != nil {
				bad("--namespace/--service-account: %v", err)
			}
		}
		if o.tokenFile == "" {
			bad("--token-file is required in pod mode")
		}
	case modeNode:
		if o.namespace != "" || o.serviceAccount != "" || o.outputDir != "" {
			bad("--namespace, --service-account and --output-dir are for pod mode; in node mode each stream's token names its identity")
		}
		if len(o.audiences) == 0 {
			bad("--audiences must name at least one audience")
		}
		switch o.auth {
		case "tokenreview":
			if o.kubeQPS <= 0 || o.kubeBurst < 1 || o.reviewConcurrency < 1 {
				bad("--kube-api-qps must be positive, --kube-api-burst and --token-review-concurrency at least 1")
			}
		case "jwks":
			if o.jwksFile == "" || o.tokenIssuer == "" {
				bad("--auth=jwks needs --jwks-file and --token-issuer")
			}
		default:
			bad("--auth must be tokenreview or jwks, not %q", o.auth)
		}
		if o.sdsSocket == "" && o.workloadAPISocket == "" {
			bad("node mode serves nothing without --sds-socket or --workload-api-socket")
		}
	default:
		bad("--mode must be pod or node, not %q", o.mode)
	}
	if o.caAddr == "" || o.caRootFile == "" {
		bad("--ca-addr and --ca-root-file are required")
	}
	switch o.federatedFile {
	case "":
		o.federatedFile = filepath.Join(filepath.Dir(o.caRootFile), agent.FederatedBundlesKey)
	case "none":
		o.federatedFile = ""
	}
	switch o.jwtBundleFile {
	case "":
		o.jwtBundleFile = filepath.Join(filepath.Dir(o.caRootFile), agent.JWTBundleKey)
	case "none":
		o.jwtBundleFile = ""
	}
	if o.kt, err = agent.ParseKeyType(o.keyType); err != nil {
		bad("--key-type: %v", err)
	}
	if o.certTTL < time.Second {
		bad("--cert-ttl must be at least 1s")
	}
	if err := (agent.Rotation{Fraction: 0.5, Jitter: o.rotationJitter}).Validate(); err != nil {
		bad("--rotation-jitter must be in [0, 0.5): %v", err)
	}
	if o.requestTimeout <= 0 {
		bad("--ca-timeout must be positive")
	}
	if o.gcPercent <= 0 {
		bad("--gc-percent must be positive, got %d", o.gcPercent)
	}
	if o.socketMode&^0o777 != 0 {
		bad("--socket-mode must be a permission mode like 0660")
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

// octalMode is a file mode flag written and read in octal, as chmod takes
// it (a plain integer flag would show 0660 as 432).
type octalMode uint32

func (m *octalMode) String() string { return fmt.Sprintf("%#o", uint32(*m)) }
func (m *octalMode) Type() string   { return "mode" }

func (m *octalMode) Set(s string) error {
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil {
		return fmt.Errorf("%q is not an octal mode such as 0660", s)
	}
	*m = octalMode(v)
	return nil
}
