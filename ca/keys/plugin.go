package keys

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"sort"
	"time"

	"github.com/meshid/meshid/ca"
)

// Plugin is a CA managed outside meshid, read from a directory in Istio's
// cacerts layout (for example a mounted Secret named cacerts).
type Plugin struct {
	Dir string
	Now func() time.Time // nil means time.Now
	// Key is the CA key when it lives in a KMS or HSM (the directory then
	// holds no ca-key.pem); nil: ca-key.pem.
	Key *External

	loaded [32]byte // digest of what Load loaded, where Watch starts from
}

// Load reads and checks the directory: the key must match ca-cert.pem and
// ca-cert.pem must chain through cert-chain.pem to root-cert.pem.
func (p *Plugin) Load() (*ca.Issuer, error) {
	files, err := readFiles(p.Dir)
	if err != nil {
		return nil, err
	}
	is, err := p.parse(files)
	if err == nil {
		p.loaded = digest(files)
	}
	return is, err
}

func (p *Plugin) parse(files map[string][]byte) (*ca.Issuer, error) {
	m, err := ParseFilesWithKey(files, p.Key)
	if err != nil {
		return nil, err
	}
	return m.Issuer(p.now())
}

func (p *Plugin) now() time.Time {
	if p.Now != nil {
		return p.Now()
	}
	return time.Now()
}

// Watch polls the directory every interval and, when its content differs
// from what Load last loaded, loads it and makes it current in src. Content that does not load is
// reported through onError once and the current issuer keeps signing:
// replacing files one at a time passes through such states. Polling, rather
// than inotify, follows the symlink swaps of mounted Secrets and needs no
// dependency; four small files a few seconds apart cost nothing.
func (p *Plugin) Watch(ctx context.Context, src *Source, interval time.Duration, log *slog.Logger, onResult func(error)) {
	applied, failed := p.loaded, [32]byte{}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		files, err := readFiles(p.Dir)
		if err != nil {
			log.Warn("plug-in CA directory unreadable; keeping the current CA", "dir", p.Dir, "error", err)
			continue
		}
		sum := digest(files)
		if sum == applied || sum == failed {
			continue
		}
		is, err := p.parse(files)
		if err != nil {
			failed = sum
			log.Error("plug-in CA files changed but do not load; keeping the current CA", "dir", p.Dir, "error", err)
		} else {
			applied = sum
			src.Set(is)
			log.Info("plug-in CA reloaded", "dir", p.Dir,
				"ca_fingerprint", is.Fingerprint(), "ca_not_after", is.Certificate().NotAfter,
				"root_fingerprint", ca.Fingerprint(is.Root()))
		}
		// Reported once the outcome is in effect, so that whoever hears
		// of a reload finds the new CA current.
		if onResult != nil {
			onResult(err)
		}
	}
}

func digest(files map[string][]byte) [32]byte {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		h.Write([]byte(n))
		h.Write([]byte{0})
		h.Write(files[n])
		h.Write([]byte{0})
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}
