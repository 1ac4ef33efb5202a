//go:build !linux

package main

import "os/exec"

// diesWithUs: only Linux can tie a child's life to its parent's; elsewhere
// the demo stops its children when it ends normally.
func diesWithUs(*exec.Cmd) {}
