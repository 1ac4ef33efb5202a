package agent

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
)

// JWTBundleKey is the key under which meshid-ca puts its JWT-SVID keys in
// the trust bundle ConfigMap of every namespace, beside root-cert.pem: a
// SPIFFE bundle of the own trust domain (JWKS, use jwt-svid).
const JWTBundleKey = "jwt-bundle.json"

// LoadJWTBundle sets b's own JWT-SVID keys to what the file at path holds
// now. No file means no keys (meshid-ca issues no JWT-SVIDs); a file that
// cannot be read or parsed changes nothing, so that a bad write never
// drops the keys held.
func LoadJWTBundle(b *Bundle, path string, log *slog.Logger) {
	data, err := readLimited(path)
	if errors.Is(err, os.ErrNotExist) {
		if len(b.JWTAuthorities()) > 0 {
			log.Info("JWT bundle gone: no JWT-SVID keys of the own trust domain held", "file", path)
		}
		b.SetJWTAuthorities(nil)
		return
	}
	if err == nil {
		var parsed *spiffebundle.Bundle
		if parsed, err = spiffebundle.Parse(b.TrustDomain(), data); err == nil {
			keys := parsed.JWTAuthorities()
			if len(keys) != len(b.JWTAuthorities()) {
				log.Info("JWT bundle taken", "file", path, "jwt_authorities", len(keys))
			}
			b.SetJWTAuthorities(keys)
			return
		}
	}
	log.Warn("JWT bundle not reloaded; keeping the keys held", "file", path, "error", err)
}

// readLimited reads a bundle file of at most maxBundlesFile bytes.
func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxBundlesFile+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxBundlesFile {
		return nil, fmt.Errorf("%s is over %d bytes", path, maxBundlesFile)
	}
	return data, nil
}
