package sds

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
)

// Listen opens a Unix socket at path with the given mode (0600: the agent's
// user only; 0660 to share with the proxy's group). Its directory is made
// with mode 0750 if missing. A stale socket left by a previous run is
// replaced; any other file at path is an error, never removed. Accepted
// connections carry the peer's process as their remote address ("pid:N"),
// or their own number ("conn:N") when the kernel cannot name the process.
func Listen(path string, mode fs.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("sds: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("sds: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("sds: removing stale socket: %w", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("sds: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("sds: %w", err)
	}
	// The directory's mode keeps others out during the instant before this.
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("sds: %w", err)
	}
	return newPeerListener(l), nil
}
