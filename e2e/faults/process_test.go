package faults

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// binDir holds this checkout's meshid-ca and meshid-agent, built by TestMain.
var binDir string

// proc is a running meshid-ca or meshid-agent. Start it again after Kill
// with Restart: same arguments, new ports (the balancer follows).
type proc struct {
	name string
	bin  string
	args []string
	// ready says which log line means "serving" and carries the addresses.
	readyMsg string

	mu        sync.Mutex
	cmd       *exec.Cmd
	exited    chan struct{}
	log       *logBuffer
	GRPCAddr  string
	HTTPAddr  string
	AdminAddr string // meshid-ca's, when it serves one
}

func startProc(t *testing.T, name, bin, readyMsg string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, bin: filepath.Join(binDir, bin), args: args, readyMsg: readyMsg, log: &logBuffer{}}
	p.start(t)
	t.Cleanup(func() {
		p.stop()
		if t.Failed() && os.Getenv("MESHID_FAULTS_LOGS") == "1" {
			t.Logf("%s log (tail):\n%s", p.name, p.log.tail(60))
		}
	})
	return p
}

func (p *proc) start(t *testing.T) {
	t.Helper()
	cmd := exec.Command(p.bin, p.args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	addrs := make(chan [3]string, 1)
	exited := make(chan struct{})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			p.log.write(line)
			var rec struct {
				Msg       string `json:"msg"`
				GRPCAddr  string `json:"grpc_addr"`
				HTTPAddr  string `json:"http_addr"`
				AdminAddr string `json:"admin_addr"`
			}
			if json.Unmarshal(line, &rec) == nil && rec.Msg == p.readyMsg {
				select {
				case addrs <- [3]string{rec.GRPCAddr, rec.HTTPAddr, rec.AdminAddr}:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
		cmd.Wait()
		close(exited)
	}()
	select {
	case a := <-addrs:
		p.mu.Lock()
		p.cmd, p.exited, p.GRPCAddr, p.HTTPAddr, p.AdminAddr = cmd, exited, a[0], a[1], a[2]
		p.mu.Unlock()
	case <-exited:
		t.Fatalf("%s exited before serving: %v\n%s", p.name, cmd.ProcessState, p.log.tail(40))
	case <-time.After(90 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("%s not serving after 90s:\n%s", p.name, p.log.tail(40))
	}
}

// Kill sends SIGKILL and waits until the process is gone.
func (p *proc) Kill() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.GRPCAddr, p.HTTPAddr, p.AdminAddr = "", "", ""
	p.mu.Unlock()
	cmd.Process.Kill()
	<-exited
}

// Restart starts the process again after Kill.
func (p *proc) Restart(t *testing.T) { p.start(t) }

func (p *proc) stop() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
		return
	default:
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
}

// Addr is the gRPC address, "" while the process is down.
func (p *proc) Addr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.GRPCAddr
}

// Admin is the admin API's address, "" while the process is down.
func (p *proc) Admin() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.AdminAddr
}

// PID is the process's id, 0 while it is down.
func (p *proc) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.GRPCAddr == "" && p.HTTPAddr == "" {
		return 0
	}
	return p.cmd.Process.Pid
}

// metric is the sum of the series of /metrics whose line starts with
// prefix (a name, or a name and labels), -1 when unreachable.
func (p *proc) metric(prefix string) float64 {
	p.mu.Lock()
	addr := p.HTTPAddr
	p.mu.Unlock()
	if addr == "" {
		return -1
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		if rest := line[len(prefix):]; !strings.Contains(prefix, "{") && rest != "" && rest[0] != ' ' && rest[0] != '{' {
			continue // another metric whose name starts with prefix
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// usage is what /proc says of a process: resident memory and open files.
type usage struct {
	RSSMiB float64
	FDs    int
}

func procUsage(pid int) (usage, error) {
	var u usage
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
			u.RSSMiB = kb / 1024
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, err
	}
	u.FDs = len(fds)
	return u, nil
}

// logBuffer keeps a process's log lines, for counting and for failures.
type logBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (b *logBuffer) write(line []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lines = append(b.lines, string(line))
}

func (b *logBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	from := max(0, len(b.lines)-n)
	return strings.Join(b.lines[from:], "\n")
}

func (b *logBuffer) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.lines)
}

// ready says whether /readyz answers 200.
func (p *proc) ready() bool {
	p.mu.Lock()
	addr := p.HTTPAddr
	p.mu.Unlock()
	if addr == "" {
		return false
	}
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
