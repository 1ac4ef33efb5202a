package main

import (
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func parse(t *testing.T, args ...string) (*options, error) {
	t.Helper()
	var o options
	fs := pflag.NewFlagSet("meshid-agent", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parse %v: %v", args, err)
	}
	return &o, o.complete()
}

func TestOptionsPodMode(t *testing.T) {
	o, err := parse(t, "--namespace=shop", "--service-account=web")
	if err != nil {
		t.Fatal(err)
	}
	if o.id.String() != "spiffe://cluster.local/ns/shop/sa/web" || o.sdsSocket != "./var/run/secrets/workload-spiffe-uds/socket" || o.kt != "ecdsa-p256" {
		t.Errorf("pod defaults: id %s, socket %s, key %s", o.id, o.sdsSocket, o.kt)
	}
}

func TestOptionsRefused(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "--namespace and --service-account are required in pod mode"},
		{[]string{"--namespace=a", "--service-account=b", "--token-file="}, "--token-file is required"},
		{[]string{"--mode=cluster"}, `--mode must be pod or node, not "cluster"`},
		{[]string{"--mode=node", "--namespace=a"}, "are for pod mode"},
		{[]string{"--mode=node", "--auth=jwks"}, "--auth=jwks needs --jwks-file and --token-issuer"},
		{[]string{"--mode=node", "--auth=oidc"}, `--auth must be tokenreview or jwks, not "oidc"`},
		{[]string{"--mode=node", "--sds-socket="}, "node mode serves nothing"},
		{[]string{"--mode=node", "--token-review-concurrency=0"}, "--token-review-concurrency"},
		{[]string{"--mode=node", "--kube-api-qps=0"}, "--kube-api-qps must be positive"},
		{[]string{"--namespace=a", "--service-account=b", "--key-type=ed25519"}, "--key-type"},
		{[]string{"--namespace=a", "--service-account=b", "--cert-ttl=0s"}, "--cert-ttl must be at least 1s"},
		{[]string{"--namespace=a", "--service-account=b", "--rotation-jitter=0.6"}, "--rotation-jitter"},
		{[]string{"--namespace=a", "--service-account=b", "--socket-mode=01777"}, "--socket-mode"},
		{[]string{"--namespace=a", "--service-account=b", "--ca-addr="}, "--ca-addr and --ca-root-file are required"},
		{[]string{"--namespace=a", "--service-account=b", "--log-level=loud"}, "--log-level"},
		{[]string{"--namespace=a", "--service-account=b", "--gc-percent=0"}, "--gc-percent must be positive"},
	} {
		_, err := parse(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want it to say %q", tc.args, err, tc.want)
		}
	}
}
