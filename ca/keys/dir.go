package keys

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// caSubdir holds the CA files inside a state directory. It is created whole
// by a rename, so a crash while generating never leaves half a CA behind.
const caSubdir = "ca"

// StateDir is a local directory that holds meshid-ca's state. Opening it
// takes an exclusive lock, so two processes can never share it.
type StateDir struct {
	path string
	lock *os.File
	mu   sync.Mutex // one Save at a time: the renewer and a root rotation both write
	// Key is the CA key when it lives in a KMS or HSM; nil: in the files.
	Key *External
}

// OpenStateDir creates path (mode 0700) if needed and locks it.
func OpenStateDir(path string) (*StateDir, error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("keys: state directory: %w", err)
	}
	lockPath := filepath.Join(path, "lock")
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("keys: state directory lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(lockPath)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("keys: state directory %s is in use by another process (pid %s)", path, strings.TrimSpace(string(holder)))
		}
		return nil, fmt.Errorf("keys: locking state directory: %w", err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &StateDir{path: path, lock: f}, nil
}

// Path is the directory's path.
func (d *StateDir) Path() string { return d.path }

// Close releases the lock.
func (d *StateDir) Close() error { return d.lock.Close() }

// LoadOrCreate reads the CA from the directory, or, on first start, stores
// the one create makes and returns it.
func (d *StateDir) LoadOrCreate(create func() (*Material, error)) (m *Material, created bool, err error) {
	caDir := filepath.Join(d.path, caSubdir)
	files, err := readFiles(caDir)
	switch {
	case err == nil:
		m, err := ParseFilesWithKey(files, d.Key)
		if err != nil {
			return nil, false, fmt.Errorf("%w (in %s)", err, caDir)
		}
		return m, false, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, false, err
	}
	m, err = create()
	if err != nil {
		return nil, false, err
	}
	if err := d.write(m); err != nil {
		return nil, false, err
	}
	return m, true, nil
}

// Load reads the stored CA.
func (d *StateDir) Load(context.Context) (*Material, error) {
	caDir := filepath.Join(d.path, caSubdir)
	files, err := readFiles(caDir)
	if err != nil {
		return nil, err
	}
	m, err := ParseFilesWithKey(files, d.Key)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, caDir)
	}
	return m, nil
}

// Save replaces the stored CA with m (a renewed intermediate, a root
// rotation's next stage), atomically, unless the store no longer holds prev
// (ErrStale): the new files are written beside the old ones and the two
// directories are exchanged in one rename, so a crash leaves either CA
// whole, never a mix and never none (which would make the next start
// generate a new root).
func (d *StateDir) Save(ctx context.Context, prev *Material, m *Material) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	stored, err := d.Load(ctx)
	if err != nil {
		return err
	}
	if !stored.Equal(prev) {
		return ErrStale
	}
	tmp, err := d.stage(m)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	caDir := filepath.Join(d.path, caSubdir)
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, caDir, unix.RENAME_EXCHANGE); err != nil {
		return fmt.Errorf("keys: replacing the stored CA: %w", err)
	}
	return syncDir(d.path)
}

func (d *StateDir) write(m *Material) error {
	tmp, err := d.stage(m)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := os.Rename(tmp, filepath.Join(d.path, caSubdir)); err != nil {
		return fmt.Errorf("keys: storing CA: %w", err)
	}
	return syncDir(d.path)
}

// stage writes m's files into a new directory beside the CA's and returns
// its path.
func (d *StateDir) stage(m *Material) (string, error) {
	files, err := m.Files()
	if err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(d.path, ".ca-new-")
	if err != nil {
		return "", fmt.Errorf("keys: %w", err)
	}
	for name, data := range files {
		mode := os.FileMode(0o644)
		if strings.HasSuffix(name, "-key.pem") {
			mode = 0o600
		}
		if err := writeFileSync(filepath.Join(tmp, name), data, mode); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
	}
	if err := os.Chmod(tmp, 0o700); err != nil {
		os.RemoveAll(tmp)
		return "", fmt.Errorf("keys: %w", err)
	}
	return tmp, nil
}

// readFiles reads the CA files present in dir. It fails with fs.ErrNotExist
// when dir itself does not exist.
func readFiles(dir string) (map[string][]byte, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("keys: %w", err)
	}
	files := make(map[string][]byte)
	for _, name := range []string{CACertFile, CAKeyFile, CAKeyURIFile, CertChainFile, RootCertFile, RootKeyFile,
		RotationFile, NextRootCertFile, NextRootKeyFile, NextCACertFile, NextCAKeyFile} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("keys: %w", err)
		}
		files[name] = data
	}
	return files, nil
}

func writeFileSync(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("keys: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("keys: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("keys: %w", err)
	}
	return f.Close()
}

func syncDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("keys: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("keys: %w", err)
	}
	return nil
}
