package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// readyTimeout bounds each wait of Up; the slowest, the node becoming
// Ready, takes about 10 s on a busy 2-core machine.
const readyTimeout = 2 * time.Minute

// Up starts a cluster as c describes and returns once the node is Ready,
// Services route and names resolve. On any failure, or when ctx ends, it
// removes whatever it had started (Down) before returning the error.
func Up(ctx context.Context, c Config) (_ *Cluster, err error) {
	c.Defaults()
	cl := &Cluster{Config: c, started: time.Now()}
	bins, err := c.binaries()
	if err != nil {
		return nil, err
	}
	if err := c.preflight(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			cl.progress("failed: %v; removing what was started", err)
			if derr := Down(c.Dir, c.Progress); derr != nil {
				err = errors.Join(err, derr)
			}
		}
	}()
	steps := []struct {
		what string
		fn   func(context.Context, map[string]string) error
	}{
		{"state directory, certificates and configuration in " + c.Dir, cl.prepare},
		{"node IP " + c.NodeIP.String() + " on lo, sysctls", cl.network},
		{"etcd", cl.startEtcd},
		{"kube-apiserver", cl.startAPIServer},
		{"kube-controller-manager and kube-scheduler", cl.startControllers},
		{"containerd, and the sandbox image", cl.startContainerd},
		{"kubelet, until the node is Ready", cl.startKubelet},
		{"kube-proxy", cl.startProxy},
		{"CoreDNS", cl.startDNS},
		{"PostgreSQL for the ledger", cl.startPostgres},
		{"the default service account", cl.waitDefaultServiceAccount},
	}
	for _, s := range steps {
		if s.fn == nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("cluster: interrupted: %w", err)
		}
		if strings.HasPrefix(s.what, "PostgreSQL") && !c.Postgres {
			continue
		}
		begin := time.Now()
		if err := s.fn(ctx, bins); err != nil {
			return nil, err
		}
		cl.progress("%-50s %5.1fs", s.what, time.Since(begin).Seconds())
	}
	return cl, nil
}

func (c *Cluster) progress(format string, args ...any) {
	fmt.Fprintf(c.Progress, "cluster: "+format+"\n", args...)
}

func (c *Config) binaries() (map[string]string, error) {
	bins := map[string]string{}
	var missing []string
	for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "coredns"} {
		for _, dir := range c.BinPath {
			p := filepath.Join(dir, name)
			if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
				bins[name] = p
				break
			}
		}
		if bins[name] == "" {
			missing = append(missing, name)
		}
	}
	// From the host: Debian's packages.
	for _, name := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ip"} {
		p, err := exec.LookPath(name)
		if err != nil {
			missing = append(missing, name)
			continue
		}
		bins[name] = p
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("cluster: not found: %s (Kubernetes' from hack/kube-assets.sh and hack/kube-node.sh, in %s; the rest from Debian: apt-get install containerd runc iptables iproute2)", strings.Join(missing, ", "), strings.Join(c.BinPath, ":"))
	}
	if c.Postgres {
		matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/postgres")
		if len(matches) == 0 {
			return nil, errors.New("cluster: PostgreSQL not installed (/usr/lib/postgresql/*/bin/postgres): apt-get install postgresql")
		}
		bins["postgres"] = matches[len(matches)-1]
	}
	return bins, nil
}

// preflight refuses, with what to do, when the machine cannot run the
// cluster or one runs already.
func (c *Config) preflight() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if os.Geteuid() != 0 {
		bad("needs root (containerd, the kubelet's mounts and cgroups, iptables)")
	}
	if len(filepath.Join(c.Dir, "run", "containerd.sock.ttrpc")) > 100 {
		bad("state directory %s is too long for Unix socket paths; set a shorter one", c.Dir)
	}
	if _, err := os.Stat(filepath.Join(c.Dir, "cluster.json")); err == nil {
		bad("a cluster is already in %s (hack/cluster.sh down removes it)", c.Dir)
	}
	if fs, err := os.ReadFile("/proc/filesystems"); err != nil || !strings.Contains(string(fs), "\toverlay\n") {
		bad("overlayfs is not available (no overlay in /proc/filesystems): containerd's snapshotter needs it")
	}
	if !cgroupsOK() {
		bad("cgroups: need cgroup v2 with the cpu, memory and pids controllers, or v1 hierarchies cpu, cpuacct, memory, pids, devices, freezer under /sys/fs/cgroup")
	}
	for _, f := range []string{"/proc/sys/net/bridge/bridge-nf-call-iptables", "/proc/sys/net/ipv4/ip_forward"} {
		if _, err := os.Stat(f); err != nil {
			bad("%s missing: kube-proxy needs bridged traffic to pass iptables (modprobe br_netfilter)", f)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			bad("CNI plugin %s not in %s: apt-get install containernetworking-plugins", p, cniBinDir)
		}
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.Equal(c.NodeIP) {
				bad("the node IP %s is already on an interface: another cluster, or a leftover (hack/cluster.sh down)", c.NodeIP)
			}
		}
	}
	if _, err := net.InterfaceByName(bridgeName); err == nil {
		bad("network device %s exists: a leftover of another cluster (hack/cluster.sh down)", bridgeName)
	}
	// The node IP is not ours yet, so a listener on the wildcard address
	// is what would collide.
	ports := []int{portEtcd, portEtcdPeer, portAPIServer, portKubelet, portKubeletHealth, portControllerMgr, portScheduler, portProxyMetrics, portProxyHealth, portDNSHealth, portDNSReady}
	if c.Postgres {
		ports = append(ports, portPostgres)
	}
	for _, p := range ports {
		if busy(p) {
			bad("port %d is in use on this machine (the cluster binds it on %s)", p, c.NodeIP)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("cluster: cannot start here:\n  %w", joinLines(errs))
	}
	return nil
}

func joinLines(errs []error) error {
	var s []string
	for _, e := range errs {
		s = append(s, e.Error())
	}
	return errors.New(strings.Join(s, "\n  "))
}

// busy reports whether something listens on port on the wildcard address
// (0.0.0.0 or ::), so that a bind to the node IP would fail. A listener on
// another address (PostgreSQL on 127.0.0.1:5432, say) does not collide.
func busy(port int) bool {
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			fl := strings.Fields(line)
			if len(fl) < 4 || fl[3] != "0A" { // TCP_LISTEN
				continue
			}
			addr, p, ok := strings.Cut(fl[1], ":")
			if n, err := strconv.ParseUint(p, 16, 16); !ok || err != nil || int(n) != port {
				continue
			}
			if strings.Trim(addr, "0") == "" {
				return true
			}
		}
	}
	return false
}

func cgroupsOK() bool {
	if data, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		have := strings.Fields(string(data))
		for _, want := range []string{"cpu", "memory", "pids"} {
			found := false
			for _, h := range have {
				found = found || h == want
			}
			if !found {
				return false
			}
		}
		return true
	}
	for _, h := range []string{"cpu", "cpuacct", "memory", "pids", "devices", "freezer"} {
		if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", h, "cgroup.procs")); err != nil {
			return false
		}
	}
	return true
}

const cniBinDir = "/usr/lib/cni"

func (c *Cluster) pki() string { return filepath.Join(c.Dir, "pki") }

// prepare writes the state directory: certificates, kubeconfigs and every
// component's configuration.
func (c *Cluster) prepare(context.Context, map[string]string) error {
	for _, d := range []string{"", "pki", "logs", "run", "etcd", "kubelet", "pod-logs", "cni", "cni-ipam", "containerd/root", "containerd/state", "containerd/opt"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o755); err != nil {
			return fmt.Errorf("cluster: %w", err)
		}
	}
	s := state{
		NodeName: c.NodeName, NodeIP: c.NodeIP.String(), PodCIDR: c.PodCIDR.String(), ServiceCIDR: c.ServiceCIDR.String(),
		ClusterDomain: c.ClusterDomain, Postgres: c.Postgres, Started: c.started, Sysctls: map[string]string{},
	}
	if err := c.writeState(s); err != nil {
		return err
	}
	now := time.Now()
	ca, err := newAuthority(now)
	if err != nil {
		return err
	}
	if err := ca.save(c.pki()); err != nil {
		return err
	}
	apiIP, err := firstIP(c.ServiceCIDR)
	if err != nil {
		return err
	}
	svc := []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc." + c.ClusterDomain, "localhost"}
	leaves := []leaf{
		{name: "apiserver", cn: "kube-apiserver", dns: svc, ips: []net.IP{c.NodeIP, apiIP, net.IPv4(127, 0, 0, 1)}, server: true},
		{name: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", groups: []string{"system:masters"}},
		{name: "admin", cn: "meshid-cluster-admin", groups: []string{"system:masters"}},
		{name: "controller-manager", cn: "system:kube-controller-manager", dns: []string{"localhost"}, ips: []net.IP{c.NodeIP}, server: true},
		{name: "scheduler", cn: "system:kube-scheduler", dns: []string{"localhost"}, ips: []net.IP{c.NodeIP}, server: true},
		{name: "kubelet", cn: "system:node:" + c.NodeName, groups: []string{"system:nodes"}, dns: []string{c.NodeName}, ips: []net.IP{c.NodeIP}, server: true},
		{name: "kube-proxy", cn: "system:kube-proxy"},
		{name: "coredns", cn: "system:coredns"},
	}
	for _, l := range leaves {
		if err := ca.issue(c.pki(), l, now); err != nil {
			return err
		}
	}
	if err := serviceAccountKey(c.pki()); err != nil {
		return err
	}
	for _, k := range []struct{ file, cert string }{
		{"admin.kubeconfig", "admin"},
		{"controller-manager.kubeconfig", "controller-manager"},
		{"scheduler.kubeconfig", "scheduler"},
		{"kubelet.kubeconfig", "kubelet"},
		{"kube-proxy.kubeconfig", "kube-proxy"},
		{"coredns.kubeconfig", "coredns"},
	} {
		if err := c.writeKubeconfig(k.file, k.cert); err != nil {
			return err
		}
	}
	return c.writeConfigs()
}

func (c *Cluster) writeState(s state) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(c.Dir, "cluster.json"), append(data, '\n'), 0o644)
}

func (c *Cluster) readState() (state, error) {
	var s state
	data, err := os.ReadFile(filepath.Join(c.Dir, "cluster.json"))
	if err != nil {
		return s, err
	}
	err = json.Unmarshal(data, &s)
	if s.Sysctls == nil {
		s.Sysctls = map[string]string{}
	}
	return s, err
}

func (c *Cluster) writeKubeconfig(file, cert string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["meshid"] = &clientcmdapi.Cluster{
		Server:               "https://" + hostPort(c.NodeIP, portAPIServer),
		CertificateAuthority: filepath.Join(c.pki(), "ca.crt"),
	}
	cfg.AuthInfos[cert] = &clientcmdapi.AuthInfo{
		ClientCertificate: filepath.Join(c.pki(), cert+".crt"),
		ClientKey:         filepath.Join(c.pki(), cert+".key"),
	}
	cfg.Contexts["meshid"] = &clientcmdapi.Context{Cluster: "meshid", AuthInfo: cert}
	cfg.CurrentContext = "meshid"
	return clientcmd.WriteToFile(*cfg, filepath.Join(c.Dir, file))
}

// firstIP is the first address of n (the API server's ClusterIP in the
// service range).
func firstIP(n *net.IPNet) (net.IP, error) {
	ip := n.IP.To4()
	if ip == nil {
		return nil, fmt.Errorf("cluster: %s is not an IPv4 range", n)
	}
	out := make(net.IP, 4)
	copy(out, ip)
	out[3]++
	return out, nil
}

func (c *Cluster) writeConfigs() error {
	gw, err := firstIP(c.PodCIDR)
	if err != nil {
		return err
	}
	files := map[string]string{
		"containerd.toml": fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = false
  # Without CAP_SYS_RESOURCE (containers, some CI machines) a negative
  # oom_score_adj cannot be set: clamp it to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[7]q
    conf_dir = %[8]q
`, filepath.Join(c.Dir, "containerd", "root"), filepath.Join(c.Dir, "containerd", "state"), c.ContainerdSocket(),
			filepath.Join(c.Dir, "run", "containerd.sock.ttrpc"), filepath.Join(c.Dir, "containerd", "opt"), c.PauseImage,
			cniBinDir, filepath.Join(c.Dir, "cni")),

		"cni/10-meshid.conflist": fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": %q,
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q, "gateway": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, cniNetwork, bridgeName, filepath.Join(c.Dir, "cni-ipam"), c.PodCIDR.String(), gw.String()),

		// Pods of dnsPolicy Default get this instead of the host's, whose
		// resolver pods may not reach.
		"resolv.conf": fmt.Sprintf("nameserver %s\n", c.NodeIP),

		"kubelet.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %[1]s
port: %[2]d
readOnlyPort: 0
healthzBindAddress: %[1]s
healthzPort: %[3]d
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[4]q}
authorization: {mode: Webhook}
tlsCertFile: %[5]q
tlsPrivateKeyFile: %[6]q
cgroupDriver: cgroupfs
# Kubelets from 1.35 refuse cgroup v1 hosts unless told otherwise; many CI
# containers still are.
failCgroupV1: false
containerRuntimeEndpoint: unix://%[7]s
clusterDNS: [%[1]s]
clusterDomain: %[8]s
resolvConf: %[9]q
podLogsDir: %[10]q
failSwapOn: false
# Imported images cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%%, imagefs.available: 1%%, nodefs.inodesFree: 1%%}
serializeImagePulls: false
maxPods: 110
podCIDR: %[11]s
%[12]s`, c.NodeIP, portKubelet, portKubeletHealth, filepath.Join(c.pki(), "ca.crt"), filepath.Join(c.pki(), "kubelet.crt"),
			filepath.Join(c.pki(), "kubelet.key"), c.ContainerdSocket(), c.ClusterDomain, filepath.Join(c.Dir, "resolv.conf"),
			filepath.Join(c.Dir, "pod-logs"), c.PodCIDR, featureGatesYAML(c.FeatureGates)),

		"kube-proxy.yaml": fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
mode: iptables
clusterCIDR: %s
bindAddress: %s
healthzBindAddress: %s
metricsBindAddress: %s
hostnameOverride: %s
# 0: leave the host's conntrack settings alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {syncPeriod: 30s, minSyncPeriod: 1s}
%s`, filepath.Join(c.Dir, "kube-proxy.kubeconfig"), c.PodCIDR, c.NodeIP, hostPort(c.NodeIP, portProxyHealth),
			hostPort(c.NodeIP, portProxyMetrics), c.NodeName, featureGatesYAML(c.FeatureGates)),

		"Corefile": fmt.Sprintf(`.:%d {
    bind %s
    errors
    health %s
    ready %s
    kubernetes %s in-addr.arpa ip6.arpa {
        kubeconfig %s meshid
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
}
`, portDNS, c.NodeIP, hostPort(c.NodeIP, portDNSHealth), hostPort(c.NodeIP, portDNSReady), c.ClusterDomain,
			filepath.Join(c.Dir, "coredns.kubeconfig")),
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(c.Dir, name), []byte(text), 0o644); err != nil {
			return fmt.Errorf("cluster: %w", err)
		}
	}
	return nil
}

// featureGatesYAML is a component configuration's featureGates field for
// gates "A=true,B=false"; empty for none.
func featureGatesYAML(gates string) string {
	if gates == "" {
		return ""
	}
	var b strings.Builder
	b.WriteString("featureGates:\n")
	for _, g := range strings.Split(gates, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(g), "=")
		fmt.Fprintf(&b, "  %s: %s\n", k, v)
	}
	return b.String()
}

// network puts the node IP on lo and turns on forwarding and bridged
// traffic through iptables, recording the sysctls' old values for Down.
func (c *Cluster) network(context.Context, map[string]string) error {
	if out, err := exec.Command("ip", "addr", "add", c.NodeIP.String()+"/32", "dev", "lo").CombinedOutput(); err != nil {
		return fmt.Errorf("cluster: ip addr add %s/32 dev lo: %w: %s", c.NodeIP, err, strings.TrimSpace(string(out)))
	}
	s, err := c.readState()
	if err != nil {
		return err
	}
	for _, k := range []string{"net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"} {
		f := filepath.Join("/proc/sys", k)
		old, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("cluster: %w", err)
		}
		if strings.TrimSpace(string(old)) == "1" {
			continue
		}
		s.Sysctls[k] = strings.TrimSpace(string(old))
		if err := c.writeState(s); err != nil {
			return err
		}
		if err := os.WriteFile(f, []byte("1\n"), 0o644); err != nil {
			return fmt.Errorf("cluster: setting %s: %w", f, err)
		}
	}
	return nil
}

func (c *Cluster) startEtcd(ctx context.Context, bins map[string]string) error {
	client := "http://" + hostPort(c.NodeIP, portEtcd)
	peer := "http://" + hostPort(c.NodeIP, portEtcdPeer)
	cmd := exec.Command(bins["etcd"],
		"--name=meshid", "--data-dir="+filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=meshid="+peer,
		"--listen-metrics-urls=", "--log-level=warn",
		// A test cluster: no fsync, as envtest runs etcd, so that a busy
		// disk does not slow the API server.
		"--unsafe-no-fsync")
	if err := start(c.Dir, "etcd", cmd); err != nil {
		return err
	}
	return c.waitHTTP(ctx, "etcd", http.DefaultClient, client+"/health")
}

func (c *Cluster) startAPIServer(ctx context.Context, bins map[string]string) error {
	pki := c.pki()
	args := []string{
		"--etcd-servers=http://" + hostPort(c.NodeIP, portEtcd),
		"--bind-address=" + c.NodeIP.String(), "--advertise-address=" + c.NodeIP.String(),
		fmt.Sprintf("--secure-port=%d", portAPIServer),
		"--tls-cert-file=" + filepath.Join(pki, "apiserver.crt"), "--tls-private-key-file=" + filepath.Join(pki, "apiserver.key"),
		"--client-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--service-cluster-ip-range=" + c.ServiceCIDR.String(),
		"--service-account-issuer=https://kubernetes.default.svc." + c.ClusterDomain,
		"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(pki, "sa.key"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--kubelet-client-certificate=" + filepath.Join(pki, "apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + filepath.Join(pki, "apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority=" + filepath.Join(pki, "ca.crt"),
		"--kubelet-preferred-address-types=InternalIP",
		"--allow-privileged=true",
		"--cert-dir=" + filepath.Join(c.Dir, "run"),
		"--profiling=false",
	}
	if c.FeatureGates != "" {
		args = append(args, "--feature-gates="+c.FeatureGates)
	}
	if c.RuntimeConfig != "" {
		args = append(args, "--runtime-config="+c.RuntimeConfig)
	}
	if err := start(c.Dir, "kube-apiserver", exec.Command(bins["kube-apiserver"], args...)); err != nil {
		return err
	}
	hc, err := adminHTTP(c.pki())
	if err != nil {
		return err
	}
	return c.waitHTTP(ctx, "kube-apiserver", hc, "https://"+hostPort(c.NodeIP, portAPIServer)+"/readyz")
}

func (c *Cluster) startControllers(ctx context.Context, bins map[string]string) error {
	pki := c.pki()
	kcm := filepath.Join(c.Dir, "controller-manager.kubeconfig")
	args := []string{
		"--kubeconfig=" + kcm, "--authentication-kubeconfig=" + kcm, "--authorization-kubeconfig=" + kcm,
		"--bind-address=" + c.NodeIP.String(), fmt.Sprintf("--secure-port=%d", portControllerMgr),
		"--tls-cert-file=" + filepath.Join(pki, "controller-manager.crt"), "--tls-private-key-file=" + filepath.Join(pki, "controller-manager.key"),
		"--client-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--service-account-private-key-file=" + filepath.Join(pki, "sa.key"),
		"--root-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--cluster-signing-cert-file=" + filepath.Join(pki, "ca.crt"),
		"--cluster-signing-key-file=" + filepath.Join(pki, "ca.key"),
		"--use-service-account-credentials=true",
		"--service-cluster-ip-range=" + c.ServiceCIDR.String(),
		"--cluster-name=meshid",
		"--leader-elect=false",
		"--controllers=*",
	}
	if c.FeatureGates != "" {
		args = append(args, "--feature-gates="+c.FeatureGates)
	}
	if err := start(c.Dir, "kube-controller-manager", exec.Command(bins["kube-controller-manager"], args...)); err != nil {
		return err
	}
	sched := filepath.Join(c.Dir, "scheduler.kubeconfig")
	args = []string{
		"--kubeconfig=" + sched, "--authentication-kubeconfig=" + sched, "--authorization-kubeconfig=" + sched,
		"--bind-address=" + c.NodeIP.String(), fmt.Sprintf("--secure-port=%d", portScheduler),
		"--tls-cert-file=" + filepath.Join(pki, "scheduler.crt"), "--tls-private-key-file=" + filepath.Join(pki, "scheduler.key"),
		"--client-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--leader-elect=false",
	}
	if c.FeatureGates != "" {
		args = append(args, "--feature-gates="+c.FeatureGates)
	}
	if err := start(c.Dir, "kube-scheduler", exec.Command(bins["kube-scheduler"], args...)); err != nil {
		return err
	}
	hc, err := adminHTTP(c.pki())
	if err != nil {
		return err
	}
	if err := c.waitHTTP(ctx, "kube-controller-manager", hc, "https://"+hostPort(c.NodeIP, portControllerMgr)+"/healthz"); err != nil {
		return err
	}
	return c.waitHTTP(ctx, "kube-scheduler", hc, "https://"+hostPort(c.NodeIP, portScheduler)+"/healthz")
}

func (c *Cluster) startContainerd(ctx context.Context, bins map[string]string) error {
	cmd := exec.Command(bins["containerd"], "--config", filepath.Join(c.Dir, "containerd.toml"))
	if err := start(c.Dir, "containerd", cmd); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "containerd", func() error {
		out, err := exec.CommandContext(ctx, bins["ctr"], "--address", c.ContainerdSocket(), "version").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	}); err != nil {
		return err
	}
	if c.PauseArchive == "" {
		return errors.New("cluster: no sandbox image archive (go run ./hack/images pause writes dist/images/pause.tar)")
	}
	return c.Import(ctx, c.PauseArchive)
}

func (c *Cluster) startKubelet(ctx context.Context, bins map[string]string) error {
	cmd := exec.Command(bins["kubelet"],
		"--config="+filepath.Join(c.Dir, "kubelet.yaml"),
		"--kubeconfig="+filepath.Join(c.Dir, "kubelet.kubeconfig"),
		"--root-dir="+filepath.Join(c.Dir, "kubelet"),
		"--cert-dir="+filepath.Join(c.Dir, "kubelet", "pki"),
		"--hostname-override="+c.NodeName,
		"--node-ip="+c.NodeIP.String(),
		"--v=1")
	// The kubelet finds containerd's shim and runc, and the mount tools,
	// on PATH.
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if err := start(c.Dir, "kubelet", cmd); err != nil {
		return err
	}
	kube, err := c.Client()
	if err != nil {
		return err
	}
	return c.waitFor(ctx, "kubelet: node "+c.NodeName+" Ready", func() error {
		if _, ok := readPID(c.Dir, "kubelet"); !ok {
			return errExited
		}
		node, err := kube.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node not Ready: %s: %s", cond.Reason, cond.Message)
			}
		}
		return errors.New("node has no Ready condition yet")
	})
}

func (c *Cluster) startProxy(ctx context.Context, bins map[string]string) error {
	cmd := exec.Command(bins["kube-proxy"], "--config="+filepath.Join(c.Dir, "kube-proxy.yaml"), "--v=1")
	if err := start(c.Dir, "kube-proxy", cmd); err != nil {
		return err
	}
	return c.waitHTTP(ctx, "kube-proxy", http.DefaultClient, "http://"+hostPort(c.NodeIP, portProxyHealth)+"/healthz")
}

// startDNS runs CoreDNS on the node IP, the kubelet's clusterDNS, as
// system:coredns with the permissions kubeadm gives it.
func (c *Cluster) startDNS(ctx context.Context, bins map[string]string) error {
	kube, err := c.Client()
	if err != nil {
		return err
	}
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
		},
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:coredns"},
		Subjects:   []rbacv1.Subject{{Kind: "User", APIGroup: "rbac.authorization.k8s.io", Name: "system:coredns"}},
	}
	if _, err := kube.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster: CoreDNS's ClusterRole: %w", err)
	}
	if _, err := kube.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster: CoreDNS's ClusterRoleBinding: %w", err)
	}
	cmd := exec.Command(bins["coredns"], "-conf", filepath.Join(c.Dir, "Corefile"))
	if err := start(c.Dir, "coredns", cmd); err != nil {
		return err
	}
	if err := c.waitHTTP(ctx, "coredns", http.DefaultClient, "http://"+hostPort(c.NodeIP, portDNSReady)+"/ready"); err != nil {
		return err
	}
	// The API server's Service name resolves from the node's resolver
	// address: what every pod asks.
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, hostPort(c.NodeIP, portDNS))
	}}
	name := "kubernetes.default.svc." + c.ClusterDomain
	return c.waitFor(ctx, "coredns: "+name, func() error {
		_, err := r.LookupHost(ctx, name)
		return err
	})
}

// startPostgres runs a PostgreSQL server of the cluster's own on the node
// IP, reachable from pods, with a database "meshid" for the chart's ledger.
func (c *Cluster) startPostgres(ctx context.Context, bins map[string]string) error {
	data := filepath.Join(c.Dir, "postgres")
	sock := filepath.Join(c.Dir, "run", "postgres")
	for _, d := range []string{data, sock} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
		if out, err := exec.Command("chown", "postgres:postgres", d).CombinedOutput(); err != nil {
			return fmt.Errorf("cluster: chown postgres %s: %w: %s (Debian's postgresql package makes the user)", d, err, out)
		}
	}
	pwBytes := make([]byte, 16)
	if _, err := rand.Read(pwBytes); err != nil {
		return err
	}
	password := hex.EncodeToString(pwBytes)
	pwFile := filepath.Join(c.Dir, "run", "postgres.pw")
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o644); err != nil {
		return err
	}
	defer os.Remove(pwFile)
	binDir := filepath.Dir(bins["postgres"])
	initdb := exec.Command("runuser", "-u", "postgres", "--", filepath.Join(binDir, "initdb"),
		"-D", data, "-U", "postgres", "--auth=scram-sha-256", "--pwfile="+pwFile, "--encoding=UTF8", "--no-instructions")
	initdb.Dir = "/"
	if out, err := initdb.CombinedOutput(); err != nil {
		return fmt.Errorf("cluster: initdb: %w: %s", err, strings.TrimSpace(string(out)))
	}
	hba := fmt.Sprintf("local all postgres trust\nhost all all %s/32 scram-sha-256\nhost all all %s scram-sha-256\n", c.NodeIP, c.PodCIDR)
	if err := os.WriteFile(filepath.Join(data, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		return err
	}
	cmd := exec.Command("runuser", "-u", "postgres", "--", bins["postgres"], "-D", data,
		"-c", "listen_addresses="+c.NodeIP.String(), "-c", fmt.Sprintf("port=%d", portPostgres),
		"-c", "unix_socket_directories="+sock, "-c", "fsync=off", "-c", "max_connections=200")
	cmd.Dir = "/"
	if err := start(c.Dir, "postgres", cmd); err != nil {
		return err
	}
	psql := func(sql string) error {
		out, err := exec.CommandContext(ctx, "runuser", "-u", "postgres", "--", filepath.Join(binDir, "psql"),
			"-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", sock, "-p", fmt.Sprint(portPostgres), "-d", "postgres", "-c", sql).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if err := c.waitFor(ctx, "PostgreSQL", func() error { return psql("SELECT 1") }); err != nil {
		return err
	}
	if err := psql(fmt.Sprintf("CREATE ROLE meshid LOGIN PASSWORD '%s'", password)); err != nil {
		return fmt.Errorf("cluster: PostgreSQL role: %w", err)
	}
	if err := psql("CREATE DATABASE meshid OWNER meshid"); err != nil {
		return fmt.Errorf("cluster: PostgreSQL database: %w", err)
	}
	dsn := fmt.Sprintf("postgres://meshid:%s@%s/meshid?sslmode=disable", password, hostPort(c.NodeIP, portPostgres))
	return os.WriteFile(filepath.Join(c.Dir, "postgres.dsn"), []byte(dsn+"\n"), 0o600)
}

func (c *Cluster) waitDefaultServiceAccount(ctx context.Context, _ map[string]string) error {
	kube, err := c.Client()
	if err != nil {
		return err
	}
	return c.waitFor(ctx, "service account default/default", func() error {
		_, err := kube.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

var errExited = errors.New("exited")

func (c *Cluster) waitHTTP(ctx context.Context, name string, hc *http.Client, url string) error {
	return c.waitFor(ctx, name, func() error {
		if _, ok := readPID(c.Dir, strings.Fields(name)[0]); !ok && isComponent(strings.Fields(name)[0]) {
			return errExited
		}
		resp, err := hc.Get(url)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
		}
		return nil
	})
}

func isComponent(name string) bool {
	for _, c := range components {
		if c == name {
			return true
		}
	}
	return false
}

// waitFor polls check until it passes, the component exits, or
// readyTimeout passes; the error then carries the last failure and the
// component's last log lines.
func (c *Cluster) waitFor(parent context.Context, what string, check func() error) error {
	ctx, cancel := context.WithTimeout(parent, readyTimeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		err := check()
		if err == nil {
			return nil
		}
		name := strings.TrimSuffix(strings.Fields(what)[0], ":")
		if errors.Is(err, errExited) {
			return fmt.Errorf("cluster: %s exited; the end of %s:\n%s", name, c.LogFile(name), tail(c.LogFile(name), 20))
		}
		select {
		case <-ctx.Done():
			if parent.Err() != nil {
				return fmt.Errorf("cluster: interrupted while waiting for %s: %w", what, parent.Err())
			}
			msg := fmt.Sprintf("cluster: %s not ready after %s: %v", what, readyTimeout, err)
			if isComponent(name) {
				msg += fmt.Sprintf("; the end of %s:\n%s", c.LogFile(name), tail(c.LogFile(name), 20))
			}
			return errors.New(msg)
		case <-tick.C:
		}
	}
}

// tail is the last n lines of file.
func tail(file string, n int) string {
	data, err := os.ReadFile(file)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}
