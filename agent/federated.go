package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FederatedBundlesKey is the key under which meshid-ca puts the federated
// trust domains' bundles in the trust bundle ConfigMap of every namespace,
// beside root-cert.pem: a JSON object from trust domain name to its SPIFFE
// bundle. Agents read it where they read the roots, so that pod-mode
// agents get it with no access of their own to anything.
const FederatedBundlesKey = "federated-bundles.json"

// maxBundlesFile caps the file: a ConfigMap holds at most 1 MiB in all.
const maxBundlesFile = 1 << 20

// ParseFederatedBundles reads what meshid-ca writes under
// FederatedBundlesKey. An entry for own, or one that does not parse, is
// reported in err and left out; the good ones are returned all the same,
// so that one bad entry does not drop the others' trust, and unreadable
// lists the trust domains whose entries failed, for the caller to keep
// what it held for them. Data that is not a JSON object at all fails whole.
func ParseFederatedBundles(data []byte, own spiffeid.TrustDomain) (bundles map[spiffeid.TrustDomain]*spiffebundle.Bundle, unreadable []spiffeid.TrustDomain, err error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, nil, fmt.Errorf("agent: federated bundles: not a JSON object of trust domain to bundle: %w", err)
	}
	out := map[spiffeid.TrustDomain]*spiffebundle.Bundle{}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(raw)) {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("agent: federated bundles: %q is not a trust domain: %w", clip(name), err))
			continue
		}
		if td == own {
			errs = append(errs, fmt.Errorf("agent: federated bundles: an entry for %s, the own trust domain, ignored", td))
			continue
		}
		b, err := spiffebundle.Parse(td, raw[name])
		if err == nil && len(b.X509Authorities()) == 0 && len(b.JWTAuthorities()) == 0 {
			err = errors.New("no keys")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("agent: federated bundle of %s: %w", td, err))
			unreadable = append(unreadable, td)
			continue
		}
		out[td] = b
	}
	return out, unreadable, errors.Join(errs...)
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return strings.ToValidUTF8(s, "?")
}

// LoadFederated sets b's federated bundles to what the file at path holds
// now. No file means no federation (the ConfigMap carries the key only
// while meshid-ca federates). A trust domain whose entry does not parse
// keeps the bundle held for it; one whose entry is gone is no longer
// trusted (its federation was removed); a file that does not parse at all
// changes nothing.
func LoadFederated(b *Bundle, path string, log *slog.Logger) {
	next, unreadable, err := readFederated(path, b.TrustDomain())
	if err != nil {
		log.Warn("federated bundles: not all reloaded", "file", path, "error", err)
		if next == nil {
			return
		}
	}
	held := b.Federated()
	for _, td := range unreadable {
		if old, ok := held[td]; ok {
			next[td] = old
		}
	}
	for td := range held {
		if _, ok := next[td]; !ok {
			log.Info("federated trust domain no longer trusted", "trust_domain", td.String())
		}
	}
	for td, nb := range next {
		if old, ok := held[td]; !ok || !old.Equal(nb) {
			log.Info("federated bundle taken", "trust_domain", td.String(), "x509_authorities", len(nb.X509Authorities()), "jwt_authorities", len(nb.JWTAuthorities()))
		}
	}
	b.SetFederated(next)
}

func readFederated(path string, own spiffeid.TrustDomain) (map[spiffeid.TrustDomain]*spiffebundle.Bundle, []spiffeid.TrustDomain, error) {
	data, err := readLimited(path)
	if errors.Is(err, os.ErrNotExist) {
		return map[spiffeid.TrustDomain]*spiffebundle.Bundle{}, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("agent: federated bundles: %w", err)
	}
	return ParseFederatedBundles(data, own)
}
