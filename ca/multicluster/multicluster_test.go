package multicluster_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/multicluster"
)

// named is an authenticator that accepts every token as shop/web.
type named string

func (n named) Authenticate(context.Context, string) (k8sauth.Caller, error) {
	return k8sauth.Caller{Namespace: "shop", ServiceAccount: "web", Method: k8sauth.Method(n)}, nil
}

type remotes struct {
	synced bool
	m      map[string]k8sauth.Authenticator
}

func (r remotes) Authenticator(id string) (k8sauth.Authenticator, bool) {
	a, ok := r.m[id]
	return a, ok
}
func (r remotes) Synced() bool { return r.synced }

func TestRouter(t *testing.T) {
	auth := func(r *multicluster.Router, cluster string) (k8sauth.Caller, error) {
		return r.Authenticate(k8sauth.WithCluster(context.Background(), cluster), "token")
	}
	var logs strings.Builder
	single := &multicluster.Router{LocalID: "cluster-a", Local: named("local"), Log: slog.New(slog.NewTextHandler(&logs, nil))}
	for _, claimed := range []string{"", "cluster-a", "prod-eu", "prod-eu"} {
		c, err := auth(single, claimed)
		if err != nil || c.Method != "local" || c.Cluster != "cluster-a" {
			t.Errorf("one cluster, caller naming %q: %+v, %v", claimed, c, err)
		}
	}
	if n := strings.Count(logs.String(), "prod-eu"); n != 1 {
		t.Errorf("a foreign cluster name logged %d times, want once:\n%s", n, logs.String())
	}

	multi := &multicluster.Router{LocalID: "cluster-a", Local: named("local"),
		Remotes: remotes{synced: true, m: map[string]k8sauth.Authenticator{"cluster-b": named("b")}}}
	if c, err := auth(multi, "cluster-b"); err != nil || c.Method != "b" || c.Cluster != "cluster-b" {
		t.Errorf("remote cluster: %+v, %v", c, err)
	}
	if c, err := auth(multi, ""); err != nil || c.Method != "local" || c.Cluster != "cluster-a" {
		t.Errorf("no cluster named: %+v, %v", c, err)
	}
	if _, err := auth(multi, "cluster-c"); !errors.Is(err, k8sauth.ErrUnauthenticated) || k8sauth.Reason(err) != "unknown_cluster" {
		t.Errorf("unknown cluster: %v", err)
	}
	notYet := &multicluster.Router{LocalID: "cluster-a", Local: named("local"), Remotes: remotes{}}
	if _, err := auth(notYet, "cluster-b"); !errors.Is(err, k8sauth.ErrUnavailable) {
		t.Errorf("before the Secrets are listed: %v, want ErrUnavailable", err)
	}
}

func TestRESTConfig(t *testing.T) {
	const good = `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://10.0.0.1:6443", certificate-authority-data: ""}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
`
	cfg, err := multicluster.RESTConfig([]byte(good))
	if err != nil || cfg.Host != "https://10.0.0.1:6443" || cfg.BearerToken != "abc" {
		t.Fatalf("RESTConfig = %+v, %v", cfg, err)
	}
	for name, tc := range map[string]struct{ from, to, msg string }{
		"exec":             {"{token: abc}", "{exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh}}", "runs a command"},
		"auth provider":    {"{token: abc}", "{auth-provider: {name: gcp}}", "auth provider"},
		"token file":       {"{token: abc}", "{tokenFile: /var/run/secrets/token}", "reads a file"},
		"client cert file": {"{token: abc}", "{client-certificate: /etc/c.pem, client-key: /etc/k.pem}", "reads a file"},
		"CA file":          {`certificate-authority-data: ""`, "certificate-authority: /etc/ca.pem", "reads a file"},
		"no context":       {"current-context: x", "", "kubeconfig"},
		"not YAML":         {"apiVersion", "{[", "does not parse"},
	} {
		_, err := multicluster.RESTConfig([]byte(strings.Replace(good, tc.from, tc.to, 1)))
		if err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v, want an error saying %q", name, err, tc.msg)
		}
	}
}

// FuzzRESTConfig: a Secret's bytes never panic the parser, and nothing it
// accepts runs a command or reads a file.
func FuzzRESTConfig(f *testing.F) {
	f.Add([]byte("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://h'}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"))
	f.Add([]byte("users: [{name: u, user: {exec: {command: sh}}}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := multicluster.RESTConfig(data)
		if err != nil {
			return
		}
		if cfg.ExecProvider != nil || cfg.AuthProvider != nil || cfg.BearerTokenFile != "" || cfg.CertFile != "" || cfg.KeyFile != "" || cfg.CAFile != "" {
			t.Fatalf("accepted a kubeconfig that runs or reads something: %+v", cfg)
		}
	})
}
