package agent

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/meshid/meshid/ca"
)

// File names written for applications without a proxy, as Istio's agent
// names them in OUTPUT_CERTS.
const (
	CertChainFile = "cert-chain.pem" // leaf, then intermediates
	KeyFile       = "key.pem"        // PKCS#8, mode 0600
	RootCertFile  = "root-cert.pem"  // every trusted root
)

// WriteFiles writes svid and the trusted roots into dir. Each file is
// replaced atomically (a temporary file, then a rename), the key first, so
// no reader sees half a file. A reader that loads key and chain separately
// can land between two renames during a rotation: it should check that they
// match (tls.LoadX509KeyPair does) and retry.
func WriteFiles(dir string, svid *SVID, roots []*x509.Certificate) error {
	var bundle bytes.Buffer
	for _, r := range roots {
		bundle.Write(ca.EncodePEM(r))
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{KeyFile, svid.KeyPEM(), 0o600},
		{CertChainFile, svid.ChainPEM(), 0o644},
		{RootCertFile, bundle.Bytes(), 0o644},
	} {
		if err := writeAtomic(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("agent: writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename there is nothing left to remove
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("agent: writing %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("agent: writing %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("agent: writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("agent: writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("agent: writing %s: %w", path, err)
	}
	return nil
}

// KeepFiles writes h's certificate into dir whenever it changes, until ctx
// ends. roots gives the trust bundle to write beside it.
func KeepFiles(ctx context.Context, h *Handle, dir string, roots func() []*x509.Certificate, log *slog.Logger) {
	for {
		changed := h.Changed()
		if svid := h.SVID(); svid != nil {
			if err := WriteFiles(dir, svid, roots()); err != nil {
				log.Error("writing certificate files", "dir", dir, "error", err)
			} else {
				log.Info("certificate files written", "dir", dir, "spiffe_id", svid.ID.String(), "serial", fmt.Sprintf("%x", svid.Serial))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}
