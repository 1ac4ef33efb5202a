package steptest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"go.step.sm/crypto/jose"
)

// IntermediateTemplate is the X.509 template (step-ca's template language:
// Go text/template with sprig, rendering JSON for go.step.sm/crypto/x509util)
// of the provisioner: whatever the CSR asks for, the certificate is a CA
// that can sign only end-entity certificates (maxPathLen 0) for URIs in the
// trust domain (critical name constraint). The trust domain comes from the
// provisioner's templateData, not from the request: one provisioner per
// trust domain, and a token holder cannot widen it. The subject is the
// token's subject (which the CSR's CN, if any, must equal); the only SAN is
// the trust domain's SPIFFE ID, as SPIRE puts on its CA certificates.
const IntermediateTemplate = `{
	"subject": {{ toJson .Subject }},
	"uris": {{ printf "spiffe://%s" .trustDomain | toJson }},
	"keyUsage": ["certSign", "crlSign"],
	"basicConstraints": {
		"isCA": true,
		"maxPathLen": 0
	},
	"nameConstraints": {
		"critical": true,
		"permittedURIDomains": [{{ toJson .trustDomain }}]
	}
}`

// Options shape the PKI and the provisioner. The zero value is usable.
type Options struct {
	// TrustDomain the provisioner's certificates are constrained to
	// (default "cluster.local").
	TrustDomain string
	// ProvisionerName (default "meshid") is the JWK provisioner's name, the
	// issuer of its tokens.
	ProvisionerName string
	// Password encrypts the provisioner's private key (default: random).
	Password string
	// MinCertDuration, DefaultCertDuration and MaxCertDuration are the
	// provisioner's claims on the lifetime of what it signs (defaults 1m,
	// 24h, 720h; step-ca's own defaults are 5m, 24h, 24h).
	MinCertDuration, DefaultCertDuration, MaxCertDuration time.Duration
	// StepInitPathLens gives the root maxPathLen 1 and step-ca's
	// intermediate maxPathLen 0, as `step ca init` does: such a PKI cannot
	// validly carry a meshid intermediate.
	StepInitPathLens bool
	// Now is the time the certificates are issued at (default time.Now()).
	// They are valid from an hour before it for a year.
	Now time.Time
}

func (o Options) withDefaults() Options {
	if o.TrustDomain == "" {
		o.TrustDomain = "cluster.local"
	}
	if o.ProvisionerName == "" {
		o.ProvisionerName = "meshid"
	}
	if o.Password == "" {
		b := make([]byte, 16)
		rand.Read(b)
		o.Password = hex.EncodeToString(b)
	}
	if o.MinCertDuration == 0 {
		o.MinCertDuration = time.Minute
	}
	if o.DefaultCertDuration == 0 {
		o.DefaultCertDuration = 24 * time.Hour
	}
	if o.MaxCertDuration == 0 {
		o.MaxCertDuration = 720 * time.Hour
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	return o
}

// Provisioner is what a client needs to get tokens accepted: a JWK
// provisioner's name (the tokens' issuer), its key ID (the tokens' kid
// header) and the password that decrypts EncryptedKey, which step-ca also
// serves at /1.0/provisioners/{kid}/encrypted-key.
type Provisioner struct {
	Name         string
	KID          string
	Password     string
	EncryptedKey string // compact JWE (PBES2-HS256+A128KW, A256GCM)
	PublicKey    *jose.JSONWebKey
}

// PKI is a step-ca PKI made in memory.
type PKI struct {
	Root             *x509.Certificate
	Intermediate     *x509.Certificate // step-ca's signing certificate
	IntermediateKey  *ecdsa.PrivateKey
	Provisioner      Provisioner
	TrustDomain      string
	CertDurations    [3]time.Duration // min, default, max
	intermediateCert []byte
	rootCert         []byte
}

// NewPKI makes a P-256 root and intermediate and a JWK provisioner.
func NewPKI(opts Options) (*PKI, error) {
	opts = opts.withDefaults()
	rootPathLen, intermediatePathLen := 2, 1
	if opts.StepInitPathLens {
		rootPathLen, intermediatePathLen = 1, 0
	}
	notBefore, notAfter := opts.Now.Add(-time.Hour), opts.Now.Add(365*24*time.Hour)

	root, rootDER, rootKey, err := newCA("steptest root CA", rootPathLen, notBefore, notAfter, nil, nil)
	if err != nil {
		return nil, err
	}
	intermediate, intDER, intKey, err := newCA("steptest intermediate CA", intermediatePathLen, notBefore, notAfter, root, rootKey)
	if err != nil {
		return nil, err
	}

	// As `step ca provisioner add --create`: an ES256 JWK whose kid is its
	// thumbprint, the private half encrypted with the password.
	jwk, err := jose.GenerateJWK("EC", "P-256", "ES256", "sig", "", 0)
	if err != nil {
		return nil, err
	}
	if jwk.KeyID, err = jose.Thumbprint(jwk); err != nil {
		return nil, err
	}
	jwe, err := jose.EncryptJWK(jwk, []byte(opts.Password))
	if err != nil {
		return nil, err
	}
	encrypted, err := jwe.CompactSerialize()
	if err != nil {
		return nil, err
	}
	public := jwk.Public()

	return &PKI{
		Root:            root,
		Intermediate:    intermediate,
		IntermediateKey: intKey,
		Provisioner: Provisioner{
			Name:         opts.ProvisionerName,
			KID:          jwk.KeyID,
			Password:     opts.Password,
			EncryptedKey: encrypted,
			PublicKey:    &public,
		},
		TrustDomain:      opts.TrustDomain,
		CertDurations:    [3]time.Duration{opts.MinCertDuration, opts.DefaultCertDuration, opts.MaxCertDuration},
		intermediateCert: intDER,
		rootCert:         rootDER,
	}, nil
}

// newCA makes a P-256 CA certificate cn signed by parent (self-signed when
// parent is nil), with its DER and key.
func newCA(cn string, maxPathLen int, notBefore, notAfter time.Time, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, []byte, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := caTemplate(cn, maxPathLen, notBefore, notAfter)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("steptest: %s: %w", cn, err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, der, key, err
}

func caTemplate(cn string, maxPathLen int, notBefore, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            maxPathLen,
		MaxPathLenZero:        maxPathLen == 0,
	}
}

// The part of step-ca's ca.json (github.com/smallstep/certificates
// authority/config.Config) that a test needs. No "db": step-ca then keeps
// used token IDs in memory, which is all one-time tokens need.
type caConfig struct {
	Root     string          `json:"root"`
	Crt      string          `json:"crt"`
	Key      string          `json:"key"`
	Address  string          `json:"address"`
	DNSNames []string        `json:"dnsNames"`
	Logger   json.RawMessage `json:"logger"`
	Auth     struct {
		Provisioners []jwkProvisioner `json:"provisioners"`
	} `json:"authority"`
}

type jwkProvisioner struct {
	Type         string           `json:"type"`
	Name         string           `json:"name"`
	Key          *jose.JSONWebKey `json:"key"`
	EncryptedKey string           `json:"encryptedKey"`
	Claims       struct {
		Min     string `json:"minTLSCertDuration"`
		Max     string `json:"maxTLSCertDuration"`
		Default string `json:"defaultTLSCertDuration"`
	} `json:"claims"`
	Options struct {
		X509 struct {
			Template     string            `json:"template"`
			TemplateData map[string]string `json:"templateData"`
		} `json:"x509"`
	} `json:"options"`
}

// WriteConfig writes ca.json, root_ca.crt, intermediate_ca.crt and
// intermediate_ca_key (unencrypted, so step-ca asks for no password) into
// dir, for a step-ca listening on addr (host:port, host an IP), and returns
// the path of ca.json.
func (p *PKI) WriteConfig(dir, addr string) (string, error) {
	keyDER, err := x509.MarshalPKCS8PrivateKey(p.IntermediateKey)
	if err != nil {
		return "", err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"root_ca.crt", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.rootCert}), 0o644},
		{"intermediate_ca.crt", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.intermediateCert}), 0o644},
		{"intermediate_ca_key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return "", err
		}
	}

	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	var cfg caConfig
	cfg.Root = filepath.Join(dir, "root_ca.crt")
	cfg.Crt = filepath.Join(dir, "intermediate_ca.crt")
	cfg.Key = filepath.Join(dir, "intermediate_ca_key")
	cfg.Address = addr
	cfg.DNSNames = []string{host}
	cfg.Logger = json.RawMessage(`{"format": "text"}`)
	var prov jwkProvisioner
	prov.Type = "JWK"
	prov.Name = p.Provisioner.Name
	prov.Key = p.Provisioner.PublicKey
	prov.EncryptedKey = p.Provisioner.EncryptedKey
	prov.Claims.Min = p.CertDurations[0].String()
	prov.Claims.Default = p.CertDurations[1].String()
	prov.Claims.Max = p.CertDurations[2].String()
	prov.Options.X509.Template = IntermediateTemplate
	prov.Options.X509.TemplateData = map[string]string{"trustDomain": p.TrustDomain}
	cfg.Auth.Provisioners = []jwkProvisioner{prov}

	b, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "ca.json")
	return path, os.WriteFile(path, b, 0o600)
}
