package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	cri "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Down removes the cluster in dir: it stops the kubelet, removes every pod
// through containerd's CRI (so that CNI releases their addresses and
// rules), stops every component, kills what is left of containers, unmounts
// what is mounted under dir, deletes the bridge and the node IP, restores
// the sysctls Up changed and deletes dir. It does as much as it can and
// returns what it could not do. A dir with nothing in it is not an error.
func Down(dir string, progress io.Writer) error {
	if progress == nil {
		progress = io.Discard
	}
	say := func(format string, args ...any) { fmt.Fprintf(progress, "cluster: "+format+"\n", args...) }
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		say("nothing to remove: %s does not exist", dir)
		return nil
	}
	c := &Cluster{}
	c.Dir = dir
	s, serr := c.readState()
	c.Defaults()
	if serr == nil {
		c.NodeIP = net.ParseIP(s.NodeIP)
		_, c.PodCIDR, _ = net.ParseCIDR(s.PodCIDR)
	}
	var errs []error
	keep := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}

	keep(stop(dir, "kubelet", 10*time.Second))
	if _, ok := readPID(dir, "containerd"); ok {
		n, err := c.removePods()
		keep(err)
		say("removed %d pods through the CRI", n)
	}
	for i := len(components) - 1; i >= 0; i-- {
		if name := components[i]; name != "kubelet" {
			keep(stop(dir, name, 10*time.Second))
		}
	}
	keep(killShims(c.ContainerdSocket()))
	keep(unmountUnder(dir))
	keep(cleanIptables())

	if _, err := net.InterfaceByName(bridgeName); err == nil {
		if out, err := exec.Command("ip", "link", "delete", bridgeName).CombinedOutput(); err != nil {
			keep(fmt.Errorf("cluster: ip link delete %s: %w: %s", bridgeName, err, out))
		}
	}
	if c.NodeIP != nil && hasAddr(c.NodeIP) {
		if out, err := exec.Command("ip", "addr", "del", c.NodeIP.String()+"/32", "dev", "lo").CombinedOutput(); err != nil {
			keep(fmt.Errorf("cluster: ip addr del %s/32 dev lo: %w: %s", c.NodeIP, err, out))
		}
	}
	if serr == nil {
		for k, v := range s.Sysctls {
			keep(os.WriteFile(filepath.Join("/proc/sys", k), []byte(v+"\n"), 0o644))
		}
	}
	if len(errs) > 0 {
		// Keep the logs for a look at what went wrong.
		return fmt.Errorf("cluster: not everything was removed (logs kept in %s):\n  %w", filepath.Join(dir, "logs"), joinLines(errs))
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	say("removed the cluster in %s", dir)
	return nil
}

func hasAddr(ip net.IP) bool {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.Equal(ip) {
			return true
		}
	}
	return false
}

// removePods stops and removes every pod sandbox containerd holds, as the
// kubelet would: CNI DEL runs for each.
func (c *Cluster) removePods() (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+c.ContainerdSocket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return 0, fmt.Errorf("cluster: containerd's CRI: %w", err)
	}
	defer conn.Close()
	rt := cri.NewRuntimeServiceClient(conn)
	pods, err := rt.ListPodSandbox(ctx, &cri.ListPodSandboxRequest{})
	if err != nil {
		return 0, fmt.Errorf("cluster: listing pods through containerd's CRI: %w", err)
	}
	var errs []error
	for _, p := range pods.GetItems() {
		if _, err := rt.StopPodSandbox(ctx, &cri.StopPodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			errs = append(errs, fmt.Errorf("stopping pod %s/%s: %w", p.GetMetadata().GetNamespace(), p.GetMetadata().GetName(), err))
			continue
		}
		if _, err := rt.RemovePodSandbox(ctx, &cri.RemovePodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			errs = append(errs, fmt.Errorf("removing pod %s/%s: %w", p.GetMetadata().GetNamespace(), p.GetMetadata().GetName(), err))
		}
	}
	if len(errs) > 0 {
		return len(pods.GetItems()), fmt.Errorf("cluster: %w", errors.Join(errs...))
	}
	return len(pods.GetItems()), nil
}

// killShims kills the containerd shims (and so the containers) that
// served the cluster's containerd, should any outlive it.
func killShims(socket string) error {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	var left []string
	for _, p := range procs {
		var pid int
		if _, err := fmt.Sscanf(p.Name(), "%d", &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if !strings.Contains(filepath.Base(args[0]), "containerd-shim") || !containsPair(args, "-address", socket) {
			continue
		}
		// The shim leads a group with its containers' processes.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		left = append(left, p.Name())
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range left {
		var pid int
		fmt.Sscanf(p, "%d", &pid)
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if alive(pid) {
			return fmt.Errorf("cluster: containerd shim %d survives SIGKILL", pid)
		}
	}
	return nil
}

func containsPair(args []string, flag, value string) bool {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag && args[i+1] == value {
			return true
		}
	}
	return false
}

// unmountUnder detaches every mount at or below dir, deepest first
// (containers' root filesystems, pods' volumes, network namespaces).
func unmountUnder(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == abs || strings.HasPrefix(mp, abs+"/") {
			points = append(points, mp)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	var errs []error
	for _, mp := range points {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("umount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cleanIptables removes what kube-proxy and the CNI plugins of this
// cluster added: the KUBE-* chains and the rules that jump to them, and
// CNI's chains for the cluster's network. iptables rules outlive their
// programs, so this is what keeps Down from leaving them behind.
func cleanIptables() error {
	var errs []error
	for _, table := range []string{"nat", "filter", "mangle"} {
		out, err := exec.Command("iptables", "-w", "-t", table, "-S").Output()
		if err != nil {
			errs = append(errs, fmt.Errorf("iptables -t %s -S: %w", table, err))
			continue
		}
		ours := func(chain string) bool {
			return strings.HasPrefix(chain, "KUBE-") || strings.HasPrefix(chain, "CNI-")
		}
		var chains []string
		for _, line := range strings.Split(string(out), "\n") {
			f := splitRule(line)
			switch {
			case len(f) >= 2 && f[0] == "-N" && ours(f[1]):
				chains = append(chains, f[1])
			case len(f) >= 2 && f[0] == "-A" && !ours(f[1]) && (jumpsTo(f, ours) || strings.Contains(line, cniNetwork)):
				// A built-in chain's rule into ours: delete it by its spec.
				args := append([]string{"-w", "-t", table, "-D"}, f[1:]...)
				if err := exec.Command("iptables", args...).Run(); err != nil {
					errs = append(errs, fmt.Errorf("iptables -t %s %s: %w", table, strings.Join(f, " "), err))
				}
			}
		}
		for _, ch := range chains {
			_ = exec.Command("iptables", "-w", "-t", table, "-F", ch).Run()
		}
		for _, ch := range chains {
			if err := exec.Command("iptables", "-w", "-t", table, "-X", ch).Run(); err != nil {
				errs = append(errs, fmt.Errorf("iptables -t %s -X %s: %w", table, ch, err))
			}
		}
	}
	return errors.Join(errs...)
}

func jumpsTo(f []string, ours func(string) bool) bool {
	for i := 0; i+1 < len(f); i++ {
		if (f[i] == "-j" || f[i] == "-g") && ours(f[i+1]) {
			return true
		}
	}
	return false
}

// splitRule splits a line of iptables -S output into its arguments as a
// shell would: iptables quotes an argument with spaces ("a b") and escapes
// quotes inside it (\"), as CNI's comments have.
func splitRule(line string) []string {
	var (
		args    []string
		cur     strings.Builder
		inQuote bool
		started bool
	)
	for i := 0; i < len(line); i++ {
		ch := line[i]
		switch {
		case ch == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
			started = true
		case ch == '"':
			inQuote = !inQuote
			started = true
		case (ch == ' ' || ch == '\t') && !inQuote:
			if started {
				args = append(args, cur.String())
				cur.Reset()
				started = false
			}
		default:
			cur.WriteByte(ch)
			started = true
		}
	}
	if started {
		args = append(args, cur.String())
	}
	return args
}
