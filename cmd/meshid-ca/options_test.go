package main

import (
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func parse(t *testing.T, args ...string) (*options, error) {
	t.Helper()
	var o options
	fs := pflag.NewFlagSet("meshid-ca", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse %v: %v", args, err)
	}
	return &o, o.complete()
}

func TestOptionsDefaults(t *testing.T) {
	o, err := parse(t)
	if err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if o.td.String() != "cluster.local" || o.audiences[0] != "istio-ca" || o.grpcAddr != ":15012" || o.httpAddr != ":15014" {
		t.Errorf("defaults: td %s, audiences %v, addrs %s %s", o.td, o.audiences, o.grpcAddr, o.httpAddr)
	}
	if o.defaultTTL.String() != "1h0m0s" || o.maxTTL.String() != "24h0m0s" || o.algorithm != "ecdsa-p256" {
		t.Errorf("defaults: ttl %s max %s key %s", o.defaultTTL, o.maxTTL, o.algorithm)
	}
	want := []string{"meshid-ca." + o.namespace + ".svc", "istiod.istio-system.svc", "localhost"}
	for _, name := range want {
		found := false
		for _, n := range o.dnsNames {
			found = found || n == name
		}
		if !found {
			t.Errorf("default serving names %v lack %s", o.dnsNames, name)
		}
	}
}

// TestOptionsRefused: every bad flag is named in one error that lists them
// all, so an operator fixes the configuration in one go.
func TestOptionsLedgerAndAdmin(t *testing.T) {
	o, err := parse(t, "--state-dir=/var/lib/x")
	if err != nil {
		t.Fatal(err)
	}
	if o.ledger != "sqlite" || o.ledgerDSN != "/var/lib/x/ledger.db" || o.ledgerRetention.Hours() != 720 || o.ledgerDelay != 4*time.Millisecond || o.serveAdmin() {
		t.Errorf("defaults: ledger %s at %s, retention %s, commit delay %s, admin served %v", o.ledger, o.ledgerDSN, o.ledgerRetention, o.ledgerDelay, o.serveAdmin())
	}
	dsnFile := t.TempDir() + "/dsn"
	if err := os.WriteFile(dsnFile, []byte("postgres://meshid@db/meshid\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err = parse(t, "--ledger=postgres", "--ledger-dsn-file="+dsnFile, "--admin-ids=spiffe://cluster.local/ns/ops/sa/admin", "--admin-service-accounts=ops/admin")
	if err != nil {
		t.Fatal(err)
	}
	if o.ledgerDSN != "postgres://meshid@db/meshid" || !o.serveAdmin() || o.admins[0].String() != "spiffe://cluster.local/ns/ops/sa/admin" {
		t.Errorf("postgres: dsn %q, admin served %v, admins %v", o.ledgerDSN, o.serveAdmin(), o.admins)
	}
}

func TestOptionsRefused(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--trust-domain=Not A Domain"}, "--trust-domain"},
		{[]string{"--audiences="}, "--audiences"},
		{[]string{"--ca-source=vault"}, `--ca-source must be dir, secret, plugin or step, not "vault"`},
		{[]string{"--state-dir="}, "--state-dir is required"},
		{[]string{"--ca-source=plugin", "--plugin-dir="}, "--plugin-dir is required"},
		{[]string{"--ca-key-type=dsa"}, "--ca-key-type"},
		{[]string{"--root-ttl=1h", "--intermediate-ttl=2h"}, "the intermediate no longer than the root"},
		{[]string{"--default-cert-ttl=48h"}, "the default no longer than the max"},
		{[]string{"--max-cert-ttl=0s"}, "--max-cert-ttl must be positive"},
		{[]string{"--auth=oidc"}, `--auth must be kubernetes, tokenreview or jwks, not "oidc"`},
		{[]string{"--auth=jwks", "--token-issuer=https://x"}, "exactly one of --jwks-file and --jwks-url"},
		{[]string{"--auth=jwks", "--jwks-file=a", "--jwks-url=https://b", "--token-issuer=https://x"}, "exactly one of --jwks-file and --jwks-url"},
		{[]string{"--auth=jwks", "--jwks-file=a"}, "--auth=jwks needs --token-issuer"},
		{[]string{"--jwks-file=a"}, "--jwks-file and --jwks-url need --auth=jwks"},
		{[]string{"--token-negative-cache-ttl=-1s"}, "--token-negative-cache-ttl"},
		{[]string{"--token-review-concurrency=0"}, "--token-review-concurrency must be at least 1"},
		{[]string{"--token-review-qps=0"}, "--token-review-qps"},
		{[]string{"--kube-api-burst=0"}, "--kube-api-burst"},
		{[]string{"--rate-limit=-1"}, "--rate-limit must not be negative"},
		{[]string{"--rate-burst=0"}, "--rate-burst must be at least 1"},
		{[]string{"--max-message-bytes=100"}, "--max-message-bytes must be at least 4096"},
		{[]string{"--log-format=xml"}, "--log-format"},
		{[]string{"--log-level=loud"}, "--log-level"},
		{[]string{"--gc-percent=0"}, "--gc-percent must be positive"},
		{[]string{"--serving-cert-ttl=1s"}, "--serving-cert-ttl must be at least 1m"},
		{[]string{"--ledger=mysql"}, `--ledger must be sqlite or postgres, not "mysql"`},
		{[]string{"--ledger=postgres"}, "--ledger=postgres needs exactly one of --ledger-dsn and --ledger-dsn-file"},
		{[]string{"--ledger=postgres", "--ledger-dsn=postgres://x", "--ledger-dsn-file=/f"}, "exactly one of"},
		{[]string{"--ledger=postgres", "--ledger-dsn-file=/nonexistent/dsn"}, "--ledger-dsn-file: open /nonexistent/dsn"},
		{[]string{"--ledger-dsn-file=/f"}, "--ledger-dsn-file is for --ledger=postgres"},
		{[]string{"--ledger-retention=-1h"}, "--ledger-retention must not be negative"},
		{[]string{"--ledger-commit-delay=-1ms"}, "--ledger-commit-delay must be between 0 and 1s"},
		{[]string{"--ledger-commit-delay=2s"}, "--ledger-commit-delay must be between 0 and 1s"},
		{[]string{"--deny-refresh-interval=1ms"}, "--deny-refresh-interval must be at least 100ms"},
		{[]string{"--admin-ids=not-a-spiffe-id"}, "--admin-ids"},
		{[]string{"--admin-service-accounts=meshid-system"}, `--admin-service-accounts: "meshid-system" is not namespace/name`},
		{[]string{"--node-proxy-service-accounts=ztunnel"}, `--node-proxy-service-accounts: nodeauth: "ztunnel" is not a service account as namespace/name`},
		{[]string{"--cluster-id="}, "--cluster-id must be a name of 1 to 253 characters"},
		{[]string{"--remote-secret-selector=a in (b"}, "--remote-secret-selector:"},
		{[]string{"--remote-bundle-configmaps"}, "--remote-bundle-configmaps needs --remote-secret-selector and --bundle-configmap"},
		{[]string{"--ca-source=step"}, "--ca-source=step needs --step-ca-url, --step-root-file, --step-provisioner and --step-password-file"},
		{[]string{"--ca-source=step", "--ca-store=vault"}, `--ca-store must be dir or secret, not "vault"`},
		{[]string{"--ca-source=step", "--step-ca-url=https://s:9000", "--step-root-file=/nonexistent", "--step-password-file=/nonexistent"}, "--step-root-file: open /nonexistent"},
	} {
		_, err := parse(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want it to say %q", tc.args, err, tc.want)
		}
	}
	_, err := parse(t, "--log-format=xml", "--rate-limit=-1")
	if err == nil || !strings.Contains(err.Error(), "--log-format") || !strings.Contains(err.Error(), "--rate-limit") {
		t.Errorf("two bad flags: %v, want both named", err)
	}
}

// TestReleaseHasNoRecordNothing: the benchmark baseline that issues without
// recording exists only in -tags meshid_bench builds.
func TestReleaseHasNoRecordNothing(t *testing.T) {
	var o options
	fs := pflag.NewFlagSet("meshid-ca", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	o.addFlags(fs)
	if err := fs.Parse([]string{"--bench-record-nothing"}); err == nil || !strings.Contains(err.Error(), "unknown flag") {
		t.Fatalf("--bench-record-nothing in a release build: %v, want unknown flag", err)
	}
}
