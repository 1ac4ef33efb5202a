package k8sauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"k8s.io/client-go/rest"
)

// Discovery is the cluster's service-account token issuer and public keys
// as the API server publishes them (/.well-known/openid-configuration and
// /openid/v1/jwks, readable by every service account through the default
// system:service-account-issuer-discovery binding). With them, tokens the
// API server would refuse for their signature or issuer are refused without
// asking it.
type Discovery struct {
	client rest.Interface
	keys   *KeySet
	issuer atomic.Pointer[string]
}

// NewDiscovery reads through client (with its credentials).
func NewDiscovery(client rest.Interface) *Discovery {
	return &Discovery{
		client: client,
		keys: &KeySet{
			fetch: func(ctx context.Context) ([]byte, error) {
				return client.Get().AbsPath("/openid/v1/jwks").DoRaw(ctx)
			},
			// The API server loads its keys at start; a new key comes with a
			// restart, and tokens naming it bring a refresh sooner.
			maxAge:     5 * time.Minute,
			minRefresh: 10 * time.Second,
			now:        time.Now,
		},
	}
}

// Load reads the issuer and the keys now.
func (d *Discovery) Load(ctx context.Context) error {
	raw, err := d.client.Get().AbsPath("/.well-known/openid-configuration").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("k8sauth: reading the API server's issuer discovery: %w", err)
	}
	var doc struct {
		Issuer string `json:"issuer"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil || doc.Issuer == "" {
		return errors.New("k8sauth: the API server's issuer discovery names no issuer")
	}
	if err := d.keys.Load(ctx); err != nil {
		return err
	}
	d.issuer.Store(&doc.Issuer)
	return nil
}

// Start loads the issuer and keys, waiting at most startWait so that a
// process starting while the API server is away is not held up; if that
// fails it tries again every discoveryRetry in the background until it
// works or ctx ends. Until then every token that passes the checks of its
// claims goes to a TokenReview.
func (d *Discovery) Start(ctx context.Context, log *slog.Logger) {
	load := func(timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		err := d.Load(ctx)
		if err == nil {
			log.Info("token issuer and keys discovered from the API server", "issuer", d.Issuer())
		} else {
			log.Warn("token issuer and keys not discovered; every token is sent to TokenReview until they are", "error", err, "retry_in", discoveryRetry)
		}
		return err
	}
	if load(startWait) == nil {
		return
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(discoveryRetry):
			}
			if load(discoveryRetry) == nil {
				return
			}
		}
	}()
}

const (
	startWait      = 3 * time.Second
	discoveryRetry = 10 * time.Second
)

// Issuer is the discovered issuer, "" until discovered.
func (d *Discovery) Issuer() string {
	if p := d.issuer.Load(); p != nil {
		return *p
	}
	return ""
}

// Keys returns the discovered keys with key ID kid.
func (d *Discovery) Keys(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	if d.issuer.Load() == nil {
		return nil, errors.New("k8sauth: keys not discovered yet")
	}
	return d.keys.Keys(ctx, kid)
}
