package main

import (
	"os/exec"
	"syscall"
)

// diesWithUs has the kernel stop cmd when the demo dies, however it dies
// (a killed terminal, a closed pipe, SIGKILL): a meshid-ca left behind
// would hold the demo's ports and answer the next run's probes.
func diesWithUs(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
