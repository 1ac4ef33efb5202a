package peers

import (
	"context"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
)

// ConfigMapStore keeps the last good bundles in a ConfigMap, a key per
// trust domain: bundles are public, and every replica reads what any of
// them fetched last.
type ConfigMapStore struct {
	Client    typedcorev1.ConfigMapsGetter
	Namespace string
	Name      string
}

// Load reads every stored bundle; none if the ConfigMap does not exist.
func (c *ConfigMapStore) Load(ctx context.Context) (map[spiffeid.TrustDomain][]byte, error) {
	cm, err := c.Client.ConfigMaps(c.Namespace).Get(ctx, c.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("peers: reading ConfigMap %s/%s: %w", c.Namespace, c.Name, err)
	}
	out := map[spiffeid.TrustDomain][]byte{}
	for k, v := range cm.Data {
		td, err := spiffeid.TrustDomainFromString(k)
		if err != nil {
			continue // not ours to read
		}
		out[td] = []byte(v)
	}
	return out, nil
}

// Save writes td's bundle, creating the ConfigMap if need be.
func (c *ConfigMapStore) Save(ctx context.Context, td spiffeid.TrustDomain, bundle []byte) error {
	err := c.update(ctx, true, func(data map[string]string) bool {
		if data[td.String()] == string(bundle) {
			return false
		}
		data[td.String()] = string(bundle)
		return true
	})
	if err != nil {
		return fmt.Errorf("peers: storing %s's bundle in ConfigMap %s/%s: %w", td, c.Namespace, c.Name, err)
	}
	return nil
}

// Prune removes every trust domain's key but keep's.
func (c *ConfigMapStore) Prune(ctx context.Context, keep []spiffeid.TrustDomain) error {
	err := c.update(ctx, false, func(data map[string]string) bool {
		changed := false
		for k := range data {
			if td, err := spiffeid.TrustDomainFromString(k); err == nil && !slices.Contains(keep, td) {
				delete(data, k)
				changed = true
			}
		}
		return changed
	})
	if err != nil {
		return fmt.Errorf("peers: pruning ConfigMap %s/%s: %w", c.Namespace, c.Name, err)
	}
	return nil
}

// update applies change to the ConfigMap's data and writes it if change
// says it changed; create makes a missing ConfigMap (else there is nothing
// to change). A write that races another replica's is tried again on the
// newer ConfigMap.
func (c *ConfigMapStore) update(ctx context.Context, create bool, change func(map[string]string) bool) error {
	cms := c.Client.ConfigMaps(c.Namespace)
	var err error
	for range 3 {
		var cm *corev1.ConfigMap
		cm, err = cms.Get(ctx, c.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			if !create {
				return nil
			}
			cm = &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: c.Name, Namespace: c.Namespace, Labels: map[string]string{"app.kubernetes.io/managed-by": "meshid-ca"}},
				Data:       map[string]string{},
			}
			change(cm.Data)
			if _, err = cms.Create(ctx, cm, metav1.CreateOptions{}); !apierrors.IsAlreadyExists(err) {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		if !change(cm.Data) {
			return nil
		}
		if _, err = cms.Update(ctx, cm, metav1.UpdateOptions{}); !apierrors.IsConflict(err) {
			return err
		}
	}
	return err
}
