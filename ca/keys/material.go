package keys

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"strings"
	"time"

	"github.com/meshid/meshid/ca"
)

// File names, as in Istio's cacerts layout.
const (
	CACertFile    = "ca-cert.pem"
	CAKeyFile     = "ca-key.pem"
	CertChainFile = "cert-chain.pem"
	RootCertFile  = "root-cert.pem"
	RootKeyFile   = "root-key.pem" // only where meshid owns the root
	// CAKeyURIFile replaces ca-key.pem when the CA key lives in a KMS or
	// HSM (--ca-key-uri): it names the key, never a PIN.
	CAKeyURIFile = "ca-key.uri"
)

// Material is a CA: the signing certificate and key, the certificates between
// it and its root, the trust bundle, and, when meshid made the root itself,
// the root's key so that intermediates can be renewed.
type Material struct {
	CACert   *x509.Certificate
	CAKey    crypto.Signer
	Chain    []*x509.Certificate // between CACert and the root, nearest first
	Roots    []*x509.Certificate // the trust bundle
	RootCert *x509.Certificate   // the root meshid owns; nil for a plug-in CA
	RootKey  crypto.Signer       // its key; nil for a plug-in CA
	Rotation *Rotation           // a root rotation under way; nil when none
	// KeyURI, when set, says CAKey lives in a KMS or HSM under that name
	// (no secrets in it): the stored form holds the name, not the key, and
	// each new intermediate certifies the same key.
	KeyURI string
}

// External is a CA key that lives in a KMS or HSM (--ca-key-uri).
type External struct {
	Signer crypto.Signer
	URI    string // what to record in ca-key.uri (no PIN)
}

// attach gives m the external key its stored form names, checking that it
// is the key the CA certificate certifies. With ext nil, m must hold its
// key itself.
func (m *Material) attach(ext *External) error {
	switch {
	case ext == nil && m.CAKey == nil:
		return fmt.Errorf("keys: the CA key is in a KMS or HSM (%s), and no --ca-key-uri names it", m.KeyURI)
	case ext == nil:
		return nil
	case m.CAKey != nil && m.KeyURI == "":
		return fmt.Errorf("keys: the stored CA has its key in %s, and --ca-key-uri names a key in a KMS or HSM: keep one (a new CA, or the files' key)", CAKeyFile)
	case !publicKeyEqual(ext.Signer.Public(), m.CACert.PublicKey):
		return fmt.Errorf("keys: the key --ca-key-uri names (%s) is not the one the stored CA certificate certifies (%s)", ext.URI, m.KeyURI)
	}
	m.CAKey, m.KeyURI = ext.Signer, ext.URI
	return nil
}

// Equal reports whether m and o are the same CA in the same rotation stage:
// what a store compares before replacing what it holds.
func (m *Material) Equal(o *Material) bool {
	a, errA := m.Files()
	b, errB := o.Files()
	if errA != nil || errB != nil || len(a) != len(b) {
		return false
	}
	for name, data := range a {
		if !bytes.Equal(data, b[name]) {
			return false
		}
	}
	return true
}

// Issuer checks the material and returns the issuer it makes at time now.
func (m *Material) Issuer(now time.Time) (*ca.Issuer, error) {
	if m.CAKey == nil {
		return nil, fmt.Errorf("keys: the CA key is in a KMS or HSM (%s), and no --ca-key-uri names it", m.KeyURI)
	}
	if m.RootKey != nil {
		if m.RootCert == nil || !publicKeyEqual(m.RootKey.Public(), m.RootCert.PublicKey) {
			return nil, fmt.Errorf("keys: %s does not match the root certificate", RootKeyFile)
		}
	}
	return ca.NewIssuer(m.CACert, m.CAKey, m.Chain, m.Roots, now)
}

// Files encodes the material in the cacerts layout.
func (m *Material) Files() (map[string][]byte, error) {
	files := map[string][]byte{CACertFile: ca.EncodePEM(m.CACert)}
	if m.KeyURI != "" {
		files[CAKeyURIFile] = []byte(m.KeyURI + "\n")
	} else {
		caKey, err := encodeKey(m.CAKey)
		if err != nil {
			return nil, err
		}
		files[CAKeyFile] = caKey
	}
	chain := ca.EncodePEM(m.CACert)
	for _, c := range m.Chain {
		chain = append(chain, ca.EncodePEM(c)...)
	}
	var roots []byte
	for _, r := range m.Roots {
		roots = append(roots, ca.EncodePEM(r)...)
	}
	files[RootCertFile] = roots
	if m.RootCert != nil {
		chain = append(chain, ca.EncodePEM(m.RootCert)...)
	}
	files[CertChainFile] = chain
	if m.RootKey != nil {
		rootKey, err := encodeKey(m.RootKey)
		if err != nil {
			return nil, err
		}
		files[RootKeyFile] = rootKey
	}
	if err := m.addRotationFiles(files); err != nil {
		return nil, err
	}
	return files, nil
}

// errMissing reports an absent required file.
var errMissing = fs.ErrNotExist

// ParseFilesWithKey is ParseFiles for a store whose CA key may be in a KMS
// or HSM: ext is that key (nil: none). Files without a key of their own
// (a plug-in CA's cacerts without ca-key.pem) take ext.
func ParseFilesWithKey(files map[string][]byte, ext *External) (*Material, error) {
	if ext != nil && len(files[CAKeyFile]) == 0 && len(files[CAKeyURIFile]) == 0 {
		files = maps.Clone(files)
		files[CAKeyURIFile] = []byte(ext.URI)
	}
	m, err := ParseFiles(files)
	if err != nil {
		return nil, err
	}
	if err := m.attach(ext); err != nil {
		return nil, err
	}
	return m, nil
}

// ParseFiles decodes material from the cacerts layout. ca-cert.pem,
// ca-key.pem and root-cert.pem are required; cert-chain.pem may be absent
// when the CA certificate is signed by a root directly, and may or may not
// repeat ca-cert.pem first and the root last, as Istio's tools write it.
func ParseFiles(files map[string][]byte) (*Material, error) {
	keyFile := CAKeyFile
	if len(files[CAKeyFile]) == 0 && len(files[CAKeyURIFile]) > 0 {
		keyFile = CAKeyURIFile
	}
	for _, name := range []string{CACertFile, keyFile, RootCertFile} {
		if len(files[name]) == 0 {
			return nil, fmt.Errorf("keys: %s: %w", name, errMissing)
		}
	}
	caCerts, err := ca.ParseCertificatesPEM(files[CACertFile])
	if err != nil {
		return nil, fmt.Errorf("keys: %s: %w", CACertFile, err)
	}
	m := &Material{CACert: caCerts[0]}
	if keyFile == CAKeyURIFile {
		// The key is in a KMS or HSM: the store attaches it (attach).
		m.KeyURI = strings.TrimSpace(string(files[CAKeyURIFile]))
	} else {
		if m.CAKey, err = parseKey(files[CAKeyFile]); err != nil {
			return nil, fmt.Errorf("keys: %s: %w", CAKeyFile, err)
		}
		if !publicKeyEqual(m.CAKey.Public(), m.CACert.PublicKey) {
			return nil, fmt.Errorf("keys: %s does not match the certificate in %s", CAKeyFile, CACertFile)
		}
	}
	if m.Roots, err = ca.ParseCertificatesPEM(files[RootCertFile]); err != nil {
		return nil, fmt.Errorf("keys: %s: %w", RootCertFile, err)
	}
	if len(files[CertChainFile]) > 0 {
		chain, err := ca.ParseCertificatesPEM(files[CertChainFile])
		if err != nil {
			return nil, fmt.Errorf("keys: %s: %w", CertChainFile, err)
		}
		// Istio's layout: the CA certificate first, then each issuer in
		// turn, possibly ending with the root. Anything else is a mix of
		// two CAs (a half-copied directory, say) and must not be served.
		if !chain[0].Equal(m.CACert) {
			return nil, fmt.Errorf("keys: %s does not start with the certificate in %s", CertChainFile, CACertFile)
		}
		for i := 1; i < len(chain); i++ {
			if err := chain[i-1].CheckSignatureFrom(chain[i]); err != nil {
				return nil, fmt.Errorf("keys: %s: certificate %d is not issued by certificate %d: %w", CertChainFile, i, i+1, err)
			}
			if !containsCert(m.Roots, chain[i]) {
				m.Chain = append(m.Chain, chain[i])
			}
		}
	}
	if len(files[RootKeyFile]) > 0 {
		if m.RootKey, err = parseKey(files[RootKeyFile]); err != nil {
			return nil, fmt.Errorf("keys: %s: %w", RootKeyFile, err)
		}
		for _, r := range m.Roots {
			if publicKeyEqual(m.RootKey.Public(), r.PublicKey) {
				m.RootCert = r
			}
		}
		if m.RootCert == nil {
			return nil, fmt.Errorf("keys: %s matches no certificate in %s", RootKeyFile, RootCertFile)
		}
	}
	if err := m.parseRotation(files); err != nil {
		return nil, err
	}
	return m, nil
}

func containsCert(certs []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range certs {
		if x.Equal(c) {
			return true
		}
	}
	return false
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("keys: encoding key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// parseKey reads one PEM private key in PKCS#8, SEC 1 or PKCS#1 form.
func parseKey(data []byte) (crypto.Signer, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM private key found")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("more than one PEM block")
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "ENCRYPTED PRIVATE KEY":
		return nil, errors.New("encrypted private keys are not supported")
	default:
		return nil, fmt.Errorf("PEM block is %q, want a private key", block.Type)
	}
	if err != nil {
		return nil, err
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		return k, nil
	case *rsa.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("unsupported CA key type %T", key)
}
