package cluster

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// components in the order Up starts them; Down stops them in reverse.
var components = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "containerd", "kubelet", "kube-proxy", "coredns", "postgres"}

// start runs a component in a session of its own, so that it outlives Up
// and Down can stop it with everything it started; its output goes to
// logs/<name>.log and its PID to run/<name>.pid.
func start(dir, name string, cmd *exec.Cmd) error {
	logFile, err := os.OpenFile(filepath.Join(dir, "logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Stdin = nil
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("cluster: starting %s: %w", name, err)
	}
	pid := cmd.Process.Pid
	// Reaped by a goroutine so that a component dying while Up waits is
	// seen as dead (no zombie); Up's process exits long before it matters.
	go cmd.Wait()
	return os.WriteFile(pidFile(dir, name), []byte(strconv.Itoa(pid)+"\n"), 0o644)
}

func pidFile(dir, name string) string { return filepath.Join(dir, "run", name+".pid") }

// readPID is the PID a component was started with and whether a process of
// that PID still runs the same program.
func readPID(dir, name string) (int, bool) {
	data, err := os.ReadFile(pidFile(dir, name))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		return 0, false
	}
	return pid, alive(pid)
}

// alive reports whether pid runs and is not a zombie.
func alive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses.
	s := string(data)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// stop ends a component's whole session: SIGTERM, then SIGKILL after
// grace.
func stop(dir, name string, grace time.Duration) error {
	pid, ok := readPID(dir, name)
	if !ok {
		os.Remove(pidFile(dir, name))
		return nil
	}
	// The process leads its own session and group (start's Setsid).
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for alive(pid) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // no way to wait on a process that is not our child
	}
	if alive(pid) {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		deadline = time.Now().Add(5 * time.Second)
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if alive(pid) {
			return fmt.Errorf("cluster: %s (pid %d) still runs after SIGKILL", name, pid)
		}
	}
	// Others of its group (children that left the leader behind).
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	err := os.Remove(pidFile(dir, name))
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	return err
}
