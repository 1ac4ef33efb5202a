package distribute

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshid/meshid/ca"
)

// Defaults: what Istio's proxies and meshid-agent mount.
const (
	DefaultName = "istio-ca-root-cert"
	DefaultKey  = "root-cert.pem"
	// FederatedKey holds the federated trust domains' bundles, a JSON
	// object of trust domain name to SPIFFE bundle, while meshid-ca
	// federates; meshid-agent reads it beside the roots (agent.FederatedBundlesKey).
	FederatedKey = "federated-bundles.json"
	// JWTKey holds the trust domain's own JWT-SVID keys, a SPIFFE bundle
	// (JWKS, use jwt-svid) that meshid-agent reads to validate JWT-SVIDs
	// and serve FetchJWTBundles (agent.JWTBundleKey).
	JWTKey = "jwt-bundle.json"
)

// managedBy labels the ConfigMaps meshid writes.
const managedBy = "meshid-ca"

// Roots gives the roots to distribute now; *keys.Source is one (through
// its issuer).
type Roots func() []*x509.Certificate

// ConfigMaps distributes the roots to every namespace.
type ConfigMaps struct {
	Client kubernetes.Interface
	Roots  Roots
	Name   string // default DefaultName
	Key    string // default DefaultKey
	// Federated gives what to write under FederatedKey; nil, or empty
	// bytes: the key is left out.
	Federated func() []byte
	// JWT gives what to write under JWTKey; nil, or empty bytes: the key
	// is left out.
	JWT  func() []byte
	Poll time.Duration // how often Roots is compared with what was written; default 5s
	Log  *slog.Logger
}

// Run keeps the ConfigMaps until ctx ends.
func (c *ConfigMaps) Run(ctx context.Context) error {
	if c.Client == nil || c.Roots == nil {
		return errors.New("distribute: ConfigMaps needs Client and Roots")
	}
	name, key, poll, log := c.Name, c.Key, c.Poll, c.Log
	if name == "" {
		name = DefaultName
	}
	if key == "" {
		key = DefaultKey
	}
	if poll <= 0 {
		poll = 5 * time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	nsFactory := informers.NewSharedInformerFactory(c.Client, 0)
	cmFactory := informers.NewSharedInformerFactoryWithOptions(c.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}))
	namespaces := nsFactory.Core().V1().Namespaces()
	configMaps := cmFactory.Core().V1().ConfigMaps()

	queue := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer queue.ShutDown()
	enqueueNS := func(obj any) {
		if ns, ok := obj.(*corev1.Namespace); ok {
			queue.Add(ns.Name)
		}
	}
	enqueueCM := func(obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		if cm, ok := obj.(*corev1.ConfigMap); ok {
			queue.Add(cm.Namespace)
		}
	}
	namespaces.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueueNS,
		UpdateFunc: func(_, obj any) { enqueueNS(obj) },
	})
	configMaps.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		UpdateFunc: func(_, obj any) { enqueueCM(obj) },
		DeleteFunc: enqueueCM,
	})
	nsFactory.Start(ctx.Done())
	cmFactory.Start(ctx.Done())
	defer nsFactory.Shutdown()
	defer cmFactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), namespaces.Informer().HasSynced, configMaps.Informer().HasSynced) {
		return ctx.Err()
	}
	log.Info("distributing the trust bundle", "configmap", name, "key", key)

	// What the workers write; changed only between passes: the roots'
	// PEM, and the federated bundles and JWT keys when there are any.
	var want map[string]string
	current := func() map[string]string {
		var b bytes.Buffer
		for _, r := range c.Roots() {
			b.Write(ca.EncodePEM(r))
		}
		d := map[string]string{key: b.String()}
		for k, f := range map[string]func() []byte{FederatedKey: c.Federated, JWTKey: c.JWT} {
			if f == nil {
				continue
			}
			if v := f(); len(v) > 0 {
				d[k] = string(v)
			}
		}
		return d
	}
	reconcile := func(ns string) error {
		n, err := namespaces.Lister().Get(ns)
		if apierrors.IsNotFound(err) || (err == nil && n.Status.Phase == corev1.NamespaceTerminating) {
			return nil
		}
		if err != nil {
			return err
		}
		if want[key] == "" {
			return nil // no CA loaded yet: never write an empty bundle
		}
		cm, err := configMaps.Lister().ConfigMaps(ns).Get(name)
		switch {
		case apierrors.IsNotFound(err):
			_, err = c.Client.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app.kubernetes.io/managed-by": managedBy}},
				Data:       want,
			}, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				return nil // the informer will tell us about it
			}
			if err == nil {
				log.Debug("trust bundle written", "namespace", ns)
			}
			return err
		case err != nil:
			return err
		case maps.Equal(cm.Data, want) && len(cm.BinaryData) == 0:
			return nil
		}
		fixed := cm.DeepCopy()
		fixed.Data = want
		fixed.BinaryData = nil
		if fixed.Labels == nil {
			fixed.Labels = map[string]string{}
		}
		fixed.Labels["app.kubernetes.io/managed-by"] = managedBy
		_, err = c.Client.CoreV1().ConfigMaps(ns).Update(ctx, fixed, metav1.UpdateOptions{})
		if err == nil {
			log.Info("trust bundle repaired or updated", "namespace", ns)
		}
		return err
	}

	// One goroutine both pulls work and watches the roots, so bundle only
	// changes between items.
	want = current()
	for _, ns := range namespaces.Informer().GetStore().ListKeys() {
		queue.Add(ns)
	}
	items := make(chan string)
	go func() {
		defer close(items)
		for {
			ns, shutdown := queue.Get()
			if shutdown {
				return
			}
			select {
			case items <- ns:
			case <-ctx.Done():
				queue.Done(ns)
				return
			}
		}
	}()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if d := current(); !maps.Equal(d, want) {
				want = d
				log.Info("trust bundle changed; rewriting it in every namespace", "roots", len(c.Roots()), "federated_bundles_bytes", len(d[FederatedKey]), "jwt_bundle_bytes", len(d[JWTKey]))
				for _, ns := range namespaces.Informer().GetStore().ListKeys() {
					queue.Add(ns)
				}
			}
		case ns, ok := <-items:
			if !ok {
				return nil
			}
			if err := reconcile(ns); err != nil {
				log.Warn("writing the trust bundle failed; retrying", "namespace", ns, "error", err)
				queue.AddRateLimited(ns)
			} else {
				queue.Forget(ns)
			}
			queue.Done(ns)
		}
	}
}

// Lagging lists the namespaces (active ones, sorted) whose ConfigMap is
// missing or lacks one of roots: what a root rotation checks before the new
// root may sign. It reads the API server, not a cache, so it sees what the
// kubelets will.
func (c *ConfigMaps) Lagging(ctx context.Context, roots []*x509.Certificate) ([]string, error) {
	name, key := c.Name, c.Key
	if name == "" {
		name = DefaultName
	}
	if key == "" {
		key = DefaultKey
	}
	nss, err := c.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("distribute: listing namespaces: %w", err)
	}
	cms, err := c.Client.CoreV1().ConfigMaps("").List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String(),
	})
	if err != nil {
		return nil, fmt.Errorf("distribute: listing %s ConfigMaps: %w", name, err)
	}
	held := make(map[string][]*x509.Certificate, len(cms.Items))
	for _, cm := range cms.Items {
		certs, _ := ca.ParseCertificatesPEM([]byte(cm.Data[key])) // unreadable counts as lagging
		held[cm.Namespace] = certs
	}
	var lagging []string
	for _, ns := range nss.Items {
		if ns.Status.Phase == corev1.NamespaceTerminating {
			continue
		}
		have := held[ns.Name]
		for _, r := range roots {
			if !slices.ContainsFunc(have, r.Equal) {
				lagging = append(lagging, ns.Name)
				break
			}
		}
	}
	slices.Sort(lagging)
	return lagging, nil
}
