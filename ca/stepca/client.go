package stepca

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/jose"
)

// Config says which step-ca to ask, and as whom.
type Config struct {
	// URL is step-ca's address, https://host:port.
	URL string
	// Roots are step-ca's roots (two while its root is rotated): trusted
	// for step-ca's TLS certificate.
	Roots []*x509.Certificate
	// Provisioner is the name of the JWK provisioner meshid uses, Password
	// the password its private key is encrypted with.
	Provisioner string
	Password    []byte
	// TrustDomain is the mesh's, asked for as the intermediate's SAN.
	TrustDomain spiffeid.TrustDomain
	// HTTPClient, when set, replaces the default: TLS trusting Root only,
	// 30 s per request.
	HTTPClient *http.Client
	Now        func() time.Time // nil: time.Now
}

// Client asks one step-ca for intermediates.
type Client struct {
	cfg  Config
	http *http.Client

	mu  sync.Mutex
	key *jose.JSONWebKey // the provisioner's, once decrypted
}

// Error is a failure that says where: step-ca's URL, the provisioner, and
// what step-ca or the client said. step-ca's own 401s say nothing more.
type Error struct {
	URL, Provisioner string
	Op               string
	Err              error
}

func (e *Error) Error() string {
	return fmt.Sprintf("stepca: %s (step-ca %s, provisioner %q): %v", e.Op, e.URL, e.Provisioner, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ErrConfig marks what retrying will not mend: no such provisioner, one
// of another type, a wrong password.
var ErrConfig = errors.New("stepca: configuration refused")

// Check reads and decrypts the provisioner's key now, so that a wrong
// password or provisioner name is known at start.
func (c *Client) Check(ctx context.Context) error {
	_, err := c.provisionerKey(ctx)
	return err
}

// New checks cfg and returns a client.
func New(cfg Config) (*Client, error) {
	u, err := url.Parse(cfg.URL)
	switch {
	case err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/"):
		return nil, fmt.Errorf("stepca: URL %q: want https://host:port", cfg.URL)
	case len(cfg.Roots) == 0:
		return nil, errors.New("stepca: step-ca's root certificate is needed")
	case cfg.Provisioner == "":
		return nil, errors.New("stepca: a provisioner name is needed")
	case len(cfg.Password) == 0:
		return nil, errors.New("stepca: the provisioner's password is empty")
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("stepca: a trust domain is needed")
	}
	cfg.URL = strings.TrimSuffix(cfg.URL, "/")
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	c := &Client{cfg: cfg, http: cfg.HTTPClient}
	if c.http == nil {
		pool := x509.NewCertPool()
		for _, r := range cfg.Roots {
			pool.AddCert(r)
		}
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		c.http = &http.Client{Transport: t, Timeout: 30 * time.Second}
	}
	return c, nil
}

func (c *Client) fail(op string, err error) error {
	return &Error{URL: c.cfg.URL, Provisioner: c.cfg.Provisioner, Op: op, Err: err}
}

// Sign asks step-ca to sign csrDER (an intermediate's request, with a
// subject CN and no SANs) valid until notAfter, and returns the
// certificate and the chain above it that step-ca sends (not its root).
func (c *Client) Sign(ctx context.Context, csrDER []byte, notAfter time.Time) (*x509.Certificate, []*x509.Certificate, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, nil, c.fail("reading the request", err)
	}
	key, err := c.provisionerKey(ctx)
	if err != nil {
		return nil, nil, err
	}
	ott, err := c.token(key, csr.Subject.CommonName)
	if err != nil {
		return nil, nil, c.fail("making a token", err)
	}
	chain, err := c.post(ctx, csrDER, ott, notAfter.UTC().Format(time.RFC3339))
	if err != nil {
		return nil, nil, err
	}
	return chain[0], chain[1:], nil
}

// post sends csrDER with the one-time token ott to /1.0/sign, asking for
// notAfter (an RFC 3339 time, or a duration from now), and returns the
// chain step-ca answers, leaf first.
func (c *Client) post(ctx context.Context, csrDER []byte, ott, notAfter string) ([]*x509.Certificate, error) {
	body, err := json.Marshal(map[string]string{
		"csr":      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
		"ott":      ott,
		"notAfter": notAfter,
	})
	if err != nil {
		return nil, c.fail("signing", err)
	}
	var resp struct {
		CertChain []string `json:"certChain"`
	}
	if err := c.do(ctx, http.MethodPost, "/1.0/sign", body, &resp); err != nil {
		var he *httpError
		if errors.As(err, &he) && he.status == http.StatusUnauthorized {
			// step-ca says no more than this. A provisioner re-created
			// with a new key is the likely cause: read it again next time.
			c.mu.Lock()
			c.key = nil
			c.mu.Unlock()
			err = fmt.Errorf("%w (the token was refused: the provisioner's key is read again at the next attempt; step-ca's log says why)", err)
		}
		return nil, c.fail("signing", err)
	}
	var chain []*x509.Certificate
	for i, p := range resp.CertChain {
		block, rest := pem.Decode([]byte(p))
		if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
			return nil, c.fail("signing", fmt.Errorf("certChain[%d] is not one PEM certificate", i))
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, c.fail("signing", fmt.Errorf("certChain[%d]: %w", i, err))
		}
		chain = append(chain, cert)
	}
	if len(chain) == 0 {
		return nil, c.fail("signing", errors.New("step-ca answered no certificate"))
	}
	return chain, nil
}

// provisionerKey finds the JWK provisioner by name and decrypts its key,
// once.
func (c *Client) provisionerKey(ctx context.Context) (*jose.JSONWebKey, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.key != nil {
		return c.key, nil
	}
	cursor := ""
	for page := 0; page < 100; page++ {
		var list struct {
			Provisioners []struct {
				Type         string `json:"type"`
				Name         string `json:"name"`
				EncryptedKey string `json:"encryptedKey"`
			} `json:"provisioners"`
			NextCursor string `json:"nextCursor"`
		}
		q := "/1.0/provisioners?limit=100"
		if cursor != "" {
			q += "&cursor=" + url.QueryEscape(cursor)
		}
		if err := c.do(ctx, http.MethodGet, q, nil, &list); err != nil {
			return nil, c.fail("listing provisioners", err)
		}
		for _, p := range list.Provisioners {
			if p.Name != c.cfg.Provisioner {
				continue
			}
			if p.Type != "JWK" {
				return nil, c.fail("reading the provisioner", fmt.Errorf("%w: it is a %s provisioner; meshid needs a JWK one", ErrConfig, p.Type))
			}
			if p.EncryptedKey == "" {
				return nil, c.fail("reading the provisioner", fmt.Errorf("%w: step-ca holds no encrypted key for it; meshid needs step-ca to hold it", ErrConfig))
			}
			plain, err := jose.Decrypt([]byte(p.EncryptedKey), jose.WithPassword(c.cfg.Password))
			if err != nil {
				return nil, c.fail("decrypting the provisioner's key", fmt.Errorf("%w: wrong password? %v", ErrConfig, err))
			}
			var jwk jose.JSONWebKey
			if err := json.Unmarshal(plain, &jwk); err != nil {
				return nil, c.fail("decrypting the provisioner's key", err)
			}
			if jwk.IsPublic() || jwk.KeyID == "" {
				return nil, c.fail("decrypting the provisioner's key", errors.New("not a private key with a key ID"))
			}
			c.key = &jwk
			return c.key, nil
		}
		if list.NextCursor == "" {
			break
		}
		cursor = list.NextCursor
	}
	return nil, c.fail("reading the provisioner", fmt.Errorf("%w: step-ca has no provisioner of that name", ErrConfig))
}

// token is the provisioner's one-time token for /1.0/sign, with the claims
// step's own client sets: iss the provisioner, a kid header, aud the sign
// URL, sub and sans, a random jti (step-ca refuses one twice), five
// minutes of validity.
func (c *Client) token(key *jose.JSONWebKey, subject string) (string, error) {
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.SignatureAlgorithm(key.Algorithm), Key: key.Key},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", key.KeyID))
	if err != nil {
		return "", err
	}
	jti := make([]byte, 32)
	if _, err := rand.Read(jti); err != nil {
		return "", err
	}
	now := c.cfg.Now()
	claims := jose.Claims{
		ID:        hex.EncodeToString(jti),
		Issuer:    c.cfg.Provisioner,
		Subject:   subject,
		Audience:  jose.Audience{c.cfg.URL + "/1.0/sign"},
		NotBefore: jose.NewNumericDate(now),
		IssuedAt:  jose.NewNumericDate(now),
		Expiry:    jose.NewNumericDate(now.Add(5 * time.Minute)),
	}
	sans := []string{spiffeid.RequireFromPath(c.cfg.TrustDomain, "").String()}
	return jose.Signed(signer).Claims(claims).Claims(map[string]any{"sans": sans}).Serialize()
}

// do sends a request and decodes the JSON answer, or step-ca's error
// {"status","message"}.
func (c *Client) do(ctx context.Context, method, path string, body []byte, v any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.cfg.URL+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 { // /1.0/sign answers 201
		var e struct {
			Message string `json:"message"`
		}
		he := &httpError{status: resp.StatusCode, msg: fmt.Sprintf("%s: %.200q", resp.Status, b)}
		if json.Unmarshal(b, &e) == nil && e.Message != "" {
			he.msg = resp.Status + ": " + e.Message
		}
		return he
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("answer does not parse: %w", err)
	}
	return nil
}

// httpError is step-ca's answer other than 2xx.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }
