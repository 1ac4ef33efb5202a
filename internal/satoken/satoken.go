// Package satoken mints tokens shaped like Kubernetes projected
// service-account tokens, signed by a local key whose JWKS meshid-ca can
// check in --auth=jwks mode. It stands in for a cluster's token issuer in the
// local demo, the load command and tests; it is not used in production.
package satoken

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Issuer signs tokens with one ECDSA P-256 key.
type Issuer struct {
	URL    string // the iss claim
	key    *ecdsa.PrivateKey
	kid    string
	signer jose.Signer
}

// New makes an issuer with a fresh key.
func New(issuerURL string) (*Issuer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return fromKey(issuerURL, key)
}

// LoadOrCreate reads the issuer key from keyPath, or creates it there (mode
// 0600) so that tokens stay valid across restarts of the demo.
func LoadOrCreate(issuerURL, keyPath string) (*Issuer, error) {
	data, err := os.ReadFile(keyPath)
	if errors.Is(err, os.ErrNotExist) {
		is, err := New(issuerURL)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(is.key)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, fmt.Errorf("satoken: %w", err)
		}
		return is, nil
	}
	if err != nil {
		return nil, fmt.Errorf("satoken: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("satoken: %s holds no PEM key", keyPath)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("satoken: %s: %w", keyPath, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("satoken: %s is not an ECDSA key", keyPath)
	}
	return fromKey(issuerURL, key)
}

func fromKey(issuerURL string, key *ecdsa.PrivateKey) (*Issuer, error) {
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(der)
	kid := base64.RawURLEncoding.EncodeToString(sum[:])
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, err
	}
	return &Issuer{URL: issuerURL, key: key, kid: kid, signer: signer}, nil
}

// JWKS is the issuer's public key set, as the API server serves it at
// /openid/v1/jwks.
func (is *Issuer) JWKS() []byte {
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: is.key.Public(), KeyID: is.kid, Algorithm: string(jose.ES256), Use: "sig"}}}
	b, err := json.Marshal(set)
	if err != nil {
		panic(err) // a valid public key always marshals
	}
	return b
}

// Claims describe one token.
type Claims struct {
	Namespace         string
	ServiceAccount    string
	ServiceAccountUID string // zero means a fixed placeholder
	PodName           string // optional: binds the token to a pod
	PodUID            string
	SecretName        string // optional: binds the token to a Secret
	SecretUID         string
	Audiences         []string
	TTL               time.Duration // 0 means one hour
	Now               time.Time     // zero means time.Now
}

// Token mints a signed token.
func (is *Issuer) Token(c Claims) (string, error) {
	now := c.Now
	if now.IsZero() {
		now = time.Now()
	}
	ttl := c.TTL
	if ttl == 0 {
		ttl = time.Hour
	}
	saUID := c.ServiceAccountUID
	if saUID == "" {
		saUID = "00000000-0000-0000-0000-0000000000sa"
	}
	k8s := map[string]any{
		"namespace":      c.Namespace,
		"serviceaccount": map[string]string{"name": c.ServiceAccount, "uid": saUID},
	}
	if c.PodName != "" {
		k8s["pod"] = map[string]string{"name": c.PodName, "uid": c.PodUID}
	}
	if c.SecretName != "" {
		k8s["secret"] = map[string]string{"name": c.SecretName, "uid": c.SecretUID}
	}
	return jwt.Signed(is.signer).Claims(jwt.Claims{
		Issuer:    is.URL,
		Subject:   "system:serviceaccount:" + c.Namespace + ":" + c.ServiceAccount,
		Audience:  jwt.Audience(c.Audiences),
		IssuedAt:  jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now),
		Expiry:    jwt.NewNumericDate(now.Add(ttl)),
	}).Claims(map[string]any{"kubernetes.io": k8s}).Serialize()
}
