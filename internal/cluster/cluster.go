package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Config says where the cluster lives and what it runs.
type Config struct {
	// Dir holds the cluster's state, logs and sockets; it must be short
	// enough for Unix socket paths (under 80 bytes).
	Dir string
	// BinPath is searched, in order, for kube-apiserver, etcd, kubelet,
	// kube-controller-manager, kube-scheduler, kube-proxy and coredns.
	BinPath []string
	// PauseArchive is the sandbox image's archive, imported before the
	// kubelet starts; PauseImage the reference it carries.
	PauseArchive string
	PauseImage   string

	NodeName    string
	NodeIP      net.IP     // added to the loopback device; every component binds to it
	PodCIDR     *net.IPNet // the node's pods (CNI bridge); at most a /16
	ServiceCIDR *net.IPNet // ClusterIPs; the first is the API server's
	// ClusterDomain is the DNS domain of Services (cluster.local).
	ClusterDomain string

	// FeatureGates is passed to every Kubernetes component
	// (--feature-gates, such as "PodCertificateRequest=true"), and
	// RuntimeConfig to the API server (--runtime-config).
	FeatureGates  string
	RuntimeConfig string

	// Postgres starts a PostgreSQL server on the node IP for the chart's
	// ledger (Debian's postgresql package), with a database and role
	// whose URL Cluster.PostgresDSN gives.
	Postgres bool

	// Progress receives one line per step; nil: discarded.
	Progress io.Writer
}

// Defaults fills what c leaves empty.
func (c *Config) Defaults() {
	if c.Dir == "" {
		c.Dir = "/var/lib/meshid-cluster"
	}
	if c.NodeName == "" {
		c.NodeName = "meshid-node"
	}
	if c.NodeIP == nil {
		c.NodeIP = net.IPv4(10, 221, 0, 1)
	}
	if c.PodCIDR == nil {
		_, c.PodCIDR, _ = net.ParseCIDR("10.222.0.0/24")
	}
	if c.ServiceCIDR == nil {
		_, c.ServiceCIDR, _ = net.ParseCIDR("10.223.0.0/24")
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = "cluster.local"
	}
	if c.PauseImage == "" {
		c.PauseImage = "localhost/meshid/pause:dev"
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
}

// Ports every component listens on, all on the node IP.
const (
	portEtcd          = 2379
	portEtcdPeer      = 2380
	portAPIServer     = 6443
	portKubelet       = 10250
	portKubeletHealth = 10248
	portControllerMgr = 10257
	portScheduler     = 10259
	portProxyMetrics  = 10249
	portProxyHealth   = 10256
	portDNS           = 53
	portDNSHealth     = 8080
	portDNSReady      = 8181
	portPostgres      = 5432
)

// bridgeName is the CNI bridge; cniNetwork the CNI network's name.
const (
	bridgeName = "meshid0"
	cniNetwork = "meshid-cluster"
)

// Cluster is a cluster Up started, or Open found running.
type Cluster struct {
	Config
	started time.Time
}

// state is what Up writes to Dir/cluster.json, for Open and Down.
type state struct {
	NodeName      string    `json:"node_name"`
	NodeIP        string    `json:"node_ip"`
	PodCIDR       string    `json:"pod_cidr"`
	ServiceCIDR   string    `json:"service_cidr"`
	ClusterDomain string    `json:"cluster_domain"`
	Postgres      bool      `json:"postgres"`
	Started       time.Time `json:"started"`
	// Sysctls holds the values Up changed, restored by Down.
	Sysctls map[string]string `json:"sysctls"`
}

// Kubeconfig is the cluster administrator's kubeconfig (system:masters).
func (c *Cluster) Kubeconfig() string { return filepath.Join(c.Dir, "admin.kubeconfig") }

// RESTConfig is the administrator's client configuration.
func (c *Cluster) RESTConfig() (*rest.Config, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig())
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	return cfg, nil
}

// ContainerdSocket is the address of the cluster's containerd.
func (c *Cluster) ContainerdSocket() string { return filepath.Join(c.Dir, "run", "containerd.sock") }

// PostgresDSN is the URL of the ledger database, reachable from pods; empty
// without Config.Postgres.
func (c *Cluster) PostgresDSN() string {
	data, err := os.ReadFile(filepath.Join(c.Dir, "postgres.dsn"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}

// LogFile is where component name (etcd, kube-apiserver, kubelet, …) logs.
func (c *Cluster) LogFile(name string) string { return filepath.Join(c.Dir, "logs", name+".log") }

// Open returns the cluster running in dir, or an error saying it is not up.
func Open(dir string) (*Cluster, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cluster: no cluster in %s (hack/cluster.sh up starts one)", dir)
	}
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	var s state
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("cluster: %s: %w", filepath.Join(dir, "cluster.json"), err)
	}
	c := &Cluster{started: s.Started}
	c.Dir = dir
	c.NodeName = s.NodeName
	c.NodeIP = net.ParseIP(s.NodeIP)
	_, c.PodCIDR, _ = net.ParseCIDR(s.PodCIDR)
	_, c.ServiceCIDR, _ = net.ParseCIDR(s.ServiceCIDR)
	c.ClusterDomain = s.ClusterDomain
	c.Postgres = s.Postgres
	c.Defaults()
	for _, name := range components {
		if name == "postgres" && !c.Postgres {
			continue
		}
		if _, alive := readPID(dir, name); !alive {
			return nil, fmt.Errorf("cluster: %s of the cluster in %s is not running (see %s; hack/cluster.sh down cleans up)", name, dir, c.LogFile(name))
		}
	}
	return c, nil
}

// Import loads image archives into the cluster's containerd, where the
// kubelet finds them (namespace k8s.io); pods name them with
// imagePullPolicy IfNotPresent or Never.
func (c *Cluster) Import(ctx context.Context, archives ...string) error {
	for _, a := range archives {
		cmd := exec.CommandContext(ctx, "ctr", "--address", c.ContainerdSocket(), "--namespace", "k8s.io", "images", "import", a)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("cluster: ctr images import %s: %w: %s", a, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// Client is a clientset of the administrator.
func (c *Cluster) Client() (kubernetes.Interface, error) {
	cfg, err := c.RESTConfig()
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

// adminHTTP is an HTTPS client presenting the admin certificate and trusting
// the cluster CA, for health endpoints.
func adminHTTP(pki string) (*http.Client, error) {
	caPEM, err := os.ReadFile(filepath.Join(pki, "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(filepath.Join(pki, "admin.crt"), filepath.Join(pki, "admin.key"))
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}},
	}, nil
}

func hostPort(ip net.IP, port int) string { return net.JoinHostPort(ip.String(), fmt.Sprint(port)) }
