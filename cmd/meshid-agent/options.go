package main

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshid/meshid/agent"
)

// options are meshid-agent's flags, validated in one place: complete.
type options struct {
	caAddr         string
	caRootFile     string
	caServerName   string
	clusterID      string
	trustDomain    string
	namespace      string
	serviceAccount string
	tokenFile      string

	sdsSocket         string
	workloadAPISocket string
	socketMode        uint32
	outputDir         string
	httpAddr          string

	keyType        string
	certTTL        time.Duration
	rotationJitter float64
	requestTimeout time.Duration
	logFormat      string
	logLevel       string

	// Filled in by complete.
	id    spiffeid.ID
	kt    agent.KeyType
	level slog.Level
}

func (o *options) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.caAddr, "ca-addr", "meshid-ca.meshid-system.svc:15012", "meshid-ca's gRPC address (TLS)")
	fs.StringVar(&o.caRootFile, "ca-root-file", "./var/run/secrets/istio/root-cert.pem", "PEM roots the CA's certificate must chain to (the istio-ca-root-cert ConfigMap mount); also served as the trust bundle")
	fs.StringVar(&o.caServerName, "ca-server-name", "", "name the CA's certificate must carry (default: the host of --ca-addr)")
	fs.StringVar(&o.clusterID, "cluster-id", "Kubernetes", "cluster ID sent to the CA, as Istio's agent sends it")
	fs.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	fs.StringVar(&o.namespace, "namespace", "", "the pod's namespace (required)")
	fs.StringVar(&o.serviceAccount, "service-account", "", "the pod's service account (required)")
	fs.StringVar(&o.tokenFile, "token-file", "./var/run/secrets/tokens/istio-token", "projected service-account token (audience istio-ca), read again for every request")
	fs.StringVar(&o.sdsSocket, "sds-socket", "./var/run/secrets/workload-spiffe-uds/socket", "Unix socket for Envoy SDS and the SPIFFE Workload API (where Istio's proxy looks for an SDS server); empty disables")
	fs.StringVar(&o.workloadAPISocket, "workload-api-socket", "", "separate Unix socket for the SPIFFE Workload API (default: served on --sds-socket)")
	fs.Uint32Var(&o.socketMode, "socket-mode", 0o660, "permissions of the sockets (0600: this user only; 0660: also the proxy's group)")
	fs.StringVar(&o.outputDir, "output-dir", "", "also write cert-chain.pem, key.pem and root-cert.pem here, rewritten on rotation; empty disables")
	fs.StringVar(&o.httpAddr, "http-addr", "127.0.0.1:15019", "address of /healthz, /readyz and /metrics")
	fs.StringVar(&o.keyType, "key-type", string(agent.ECDSAP256), "workload key type: ecdsa-p256 or rsa-2048")
	fs.DurationVar(&o.certTTL, "cert-ttl", time.Hour, "certificate lifetime asked of the CA (it may clamp it)")
	fs.Float64Var(&o.rotationJitter, "rotation-jitter", 0.1, "renewal happens at half life ± this fraction of the lifetime")
	fs.DurationVar(&o.requestTimeout, "ca-timeout", 10*time.Second, "timeout of one certificate request")
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
	if o.namespace == "" || o.serviceAccount == "" {
		bad("--namespace and --service-account are required (the pod's identity)")
	} else if err == nil {
		if o.id, err = spiffeid.FromSegments(td, "ns", o.namespace, "sa", o.serviceAccount); err != nil {
			bad("--namespace/--service-account: %v", err)
		}
	}
	if o.caAddr == "" || o.caRootFile == "" {
		bad("--ca-addr and --ca-root-file are required")
	}
	if o.tokenFile == "" {
		bad("--token-file is required")
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
