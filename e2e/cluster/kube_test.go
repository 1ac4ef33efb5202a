package clustere2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
)

// deadline bounds each wait of the test: a pod starting, a certificate
// rotating. Roomy, for a busy 2-core machine.
const deadline = 3 * time.Minute

// eventually polls cond every 250 ms until it returns nil, and fails t
// with its last error after within.
func eventually(t *testing.T, within time.Duration, what string, cond func() error) {
	t.Helper()
	end := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s: %v", within, what, err)
		}
		time.Sleep(250 * time.Millisecond) // poll interval
	}
}

// podReady waits for the pod to be Ready and returns it.
func podReady(t *testing.T, kube kubernetes.Interface, ns, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	eventually(t, deadline, "pod "+ns+"/"+name+" Ready", func() error {
		p, err := kube.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		pod = p
		if ready(p) {
			return nil
		}
		failFast(t, p)
		return fmt.Errorf("phase %s: %s", p.Status.Phase, podProblems(p))
	})
	return pod
}

// failFast fails t at once for a pod that cannot start by itself: an
// image that is not on the node, a spec the kubelet refuses.
func failFast(t *testing.T, p *corev1.Pod) {
	t.Helper()
	for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
		if w := cs.State.Waiting; w != nil {
			switch w.Reason {
			case "ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError":
				t.Fatalf("pod %s/%s cannot start: %s", p.Namespace, p.Name, podProblems(p))
			}
		}
	}
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// podProblems says why a pod is not Ready, from its containers' states.
func podProblems(p *corev1.Pod) string {
	var s []string
	for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
		switch {
		case cs.State.Waiting != nil:
			s = append(s, fmt.Sprintf("%s waiting: %s %s", cs.Name, cs.State.Waiting.Reason, cs.State.Waiting.Message))
		case cs.State.Terminated != nil:
			s = append(s, fmt.Sprintf("%s terminated: %s (exit %d) %s", cs.Name, cs.State.Terminated.Reason, cs.State.Terminated.ExitCode, cs.State.Terminated.Message))
		case !cs.Ready:
			s = append(s, cs.Name+" running, not ready")
		}
	}
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Message != "" {
			s = append(s, fmt.Sprintf("%s: %s", c.Type, c.Message))
		}
	}
	return strings.Join(s, "; ")
}

// logs is a container's log, through the API server and the kubelet.
func logs(kube kubernetes.Interface, ns, pod, container string) (string, error) {
	data, err := kube.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: container}).DoRaw(context.Background())
	return string(data), err
}

// execIn runs a command in a container as kubectl exec does (API server
// → kubelet → containerd's stream server) and returns its stdout.
func execIn(cfg *rest.Config, kube kubernetes.Interface, ns, pod, container string, command ...string) (string, string, error) {
	req := kube.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: container, Command: command, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	exec, err := remotecommand.NewSPDYExecutor(cfg, http.MethodPost, req.URL())
	if err != nil {
		return "", "", err
	}
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = exec.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
	return stdout.String(), stderr.String(), err
}

// portForward forwards a local port to the pod's port, as kubectl
// port-forward does, until t ends; it returns the local address.
func portForward(t *testing.T, cfg *rest.Config, ns, pod string, port int) string {
	t.Helper()
	transport, upgrader, err := spdy.RoundTripperFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(cfg.Host)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = fmt.Sprintf("/api/v1/namespaces/%s/pods/%s/portforward", ns, pod)
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, u)
	stop, readyCh := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, stop, readyCh, io.Discard, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- fw.ForwardPorts() }()
	t.Cleanup(func() { close(stop) })
	select {
	case <-readyCh:
	case err := <-errc:
		t.Fatalf("port-forward to %s/%s:%d: %v", ns, pod, port, err)
	case <-time.After(time.Minute):
		t.Fatalf("port-forward to %s/%s:%d not ready within a minute", ns, pod, port)
	}
	ports, err := fw.GetPorts()
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ports[0].Local)))
}

// workloadStatus is a workload's GET /status, read from the node (pod IPs
// are routed on it).
type workloadStatus struct {
	ID        string     `json:"id"`
	Certs     []certSeen `json:"certs"`
	PeerCerts []certSeen `json:"peer_certs"`
	OK        int        `json:"ok"`
	Failed    int        `json:"failed"`
	LastOK    time.Time  `json:"last_ok"`
	LastError string     `json:"last_error"`
	Errors    []string   `json:"errors"`
	Lapses    []time.Time
}

type certSeen struct {
	ID       string    `json:"id"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	Seen     time.Time `json:"seen"`
}

func getStatus(pod *corev1.Pod) (workloadStatus, error) {
	var s workloadStatus
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(pod.Status.PodIP, "8080") + "/status")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&s)
	return s, err
}

// proc is a process on the node.
type proc struct {
	pid     int
	argv0   string
	rssKiB  int
	status  map[string]string // /proc/PID/status
	cgroups string
}

// processes lists the node's processes whose program's base name is one of
// names.
func processes(names ...string) []proc {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	entries, _ := os.ReadDir("/proc")
	var out []proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 {
			continue
		}
		argv0 := strings.SplitN(string(cmdline), "\x00", 2)[0]
		if !want[filepath.Base(argv0)] {
			continue
		}
		p := proc{pid: pid, argv0: argv0, status: map[string]string{}}
		if data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status")); err == nil {
			for _, line := range strings.Split(string(data), "\n") {
				k, v, ok := strings.Cut(line, ":")
				if ok {
					p.status[k] = strings.TrimSpace(v)
				}
			}
			p.rssKiB, _ = strconv.Atoi(strings.TrimSuffix(p.status["VmRSS"], " kB"))
		}
		if data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup")); err == nil {
			p.cgroups = string(data)
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

// inPod reports whether p runs in the pod of that UID (its cgroup path
// names it, with the kubelet's cgroupfs driver).
func (p proc) inPod(uid string) bool {
	return strings.Contains(p.cgroups, "pod"+uid)
}
