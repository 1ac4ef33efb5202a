package multicluster

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshid/meshid/ca/k8sauth"
)

// Build makes what meshid-ca needs of a remote cluster from its REST
// config: the authenticator of its tokens, running until ctx ends.
type Build func(ctx context.Context, clusterID string, cfg *rest.Config) (k8sauth.Authenticator, error)

// Remotes are the remote clusters the watched Secrets describe.
type Remotes struct {
	localID string
	build   Build
	log     *slog.Logger
	inf     cache.SharedIndexInformer
	ctx     context.Context

	mu       sync.Mutex
	clusters map[string]*remote
	each     []*subscription
}

type remote struct {
	id     string
	secret string   // namespace/name of the Secret it came from
	sum    [32]byte // of its kubeconfig
	auth   k8sauth.Authenticator
	client kubernetes.Interface
	ctx    context.Context
	cancel context.CancelFunc
}

type subscription struct {
	ctx context.Context
	run func(ctx context.Context, clusterID string, client kubernetes.Interface)
}

// Watch watches the Secrets in namespace that selector (a label selector,
// e.g. istio/multiCluster=true) picks, through client, until ctx ends.
// localID is this cluster's ID: a Secret naming it is ignored.
func Watch(ctx context.Context, client kubernetes.Interface, namespace, selector, localID string, build Build, log *slog.Logger) (*Remotes, error) {
	if selector == "" || namespace == "" || build == nil {
		return nil, errors.New("multicluster: Watch needs a namespace, a selector and a Build")
	}
	if _, err := metav1.ParseToLabelSelector(selector); err != nil {
		return nil, fmt.Errorf("multicluster: selector %q: %w", selector, err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	secrets := client.CoreV1().Secrets(namespace)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			opts.LabelSelector = selector
			return secrets.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.LabelSelector = selector
			return secrets.Watch(ctx, opts)
		},
	}
	r := &Remotes{localID: localID, build: build, log: log, ctx: ctx, clusters: map[string]*remote{}}
	r.inf = cache.NewSharedIndexInformerWithOptions(lw, &corev1.Secret{}, cache.SharedIndexInformerOptions{ObjectDescription: "remote cluster secrets"})
	if _, err := r.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.sync(obj) },
		UpdateFunc: func(_, obj any) { r.sync(obj) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if s, ok := obj.(*corev1.Secret); ok {
				r.dropSecret(s.Namespace+"/"+s.Name, nil)
			}
		},
	}); err != nil {
		return nil, fmt.Errorf("multicluster: %w", err)
	}
	go r.inf.RunWithContext(ctx)
	go func() {
		<-ctx.Done()
		r.mu.Lock()
		defer r.mu.Unlock()
		for id, c := range r.clusters {
			c.cancel()
			delete(r.clusters, id)
		}
	}()
	return r, nil
}

// Synced says whether the Secrets were listed once.
func (r *Remotes) Synced() bool { return r.inf.HasSynced() }

// Authenticator implements [Authenticators].
func (r *Remotes) Authenticator(clusterID string) (k8sauth.Authenticator, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.clusters[clusterID]
	if !ok {
		return nil, false
	}
	return c.auth, true
}

// Clusters lists the remote cluster IDs known now, sorted.
func (r *Remotes) Clusters() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, 0, len(r.clusters))
	for id := range r.clusters {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Each runs run for every remote cluster, those known now and those added
// later, each on its own goroutine with a context that ends when the
// cluster is dropped (or changed) or ctx ends.
func (r *Remotes) Each(ctx context.Context, run func(ctx context.Context, clusterID string, client kubernetes.Interface)) {
	s := &subscription{ctx: ctx, run: run}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.each = append(r.each, s)
	for _, c := range r.clusters {
		r.start(s, c)
	}
}

// start runs s for c; r.mu is held.
func (r *Remotes) start(s *subscription, c *remote) {
	if s.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithCancel(c.ctx)
	stop := context.AfterFunc(s.ctx, cancel)
	go func() {
		defer stop()
		defer cancel()
		s.run(ctx, c.id, c.client)
	}()
}

// sync brings the clusters of one Secret in line with its data.
func (r *Remotes) sync(obj any) {
	s, ok := obj.(*corev1.Secret)
	if !ok {
		return
	}
	key := s.Namespace + "/" + s.Name
	keep := map[string]bool{}
	for id, kubeconfig := range s.Data {
		keep[id] = true
		if err := r.add(key, id, kubeconfig); err != nil {
			r.log.Error("remote cluster not added", "secret", key, "cluster", id, "error", err)
			delete(keep, id)
		}
	}
	r.dropSecret(key, keep)
}

// add adds or replaces cluster id from the Secret key.
func (r *Remotes) add(key, id string, kubeconfig []byte) error {
	sum := sha256.Sum256(kubeconfig)
	r.mu.Lock()
	old, exists := r.clusters[id]
	r.mu.Unlock()
	switch {
	case id == r.localID:
		return fmt.Errorf("it is this cluster's own ID (--cluster-id)")
	case exists && old.secret != key:
		return fmt.Errorf("cluster %q already comes from Secret %s", id, old.secret)
	case exists && old.sum == sum:
		return nil
	}
	cfg, err := RESTConfig(kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("multicluster: %w", err)
	}
	ctx, cancel := context.WithCancel(r.ctx)
	auth, err := r.build(ctx, id, cfg)
	if err != nil {
		cancel()
		return err
	}
	c := &remote{id: id, secret: key, sum: sum, auth: auth, client: client, ctx: ctx, cancel: cancel}
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.clusters[id]; ok {
		old.cancel()
	}
	r.clusters[id] = c
	r.each = slices.DeleteFunc(r.each, func(s *subscription) bool { return s.ctx.Err() != nil })
	for _, s := range r.each {
		r.start(s, c)
	}
	verb := "added"
	if exists {
		verb = "replaced"
	}
	r.log.Info("remote cluster "+verb, "cluster", id, "secret", key, "server", cfg.Host)
	return nil
}

// dropSecret drops the clusters that came from Secret key, but those in
// keep.
func (r *Remotes) dropSecret(key string, keep map[string]bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, c := range r.clusters {
		if c.secret == key && !keep[id] {
			c.cancel()
			delete(r.clusters, id)
			r.log.Info("remote cluster dropped", "cluster", id, "secret", key)
		}
	}
}

// RESTConfig reads a remote cluster's kubeconfig. Everything must be in
// it: a kubeconfig that runs a command (exec, auth-provider) or reads a
// file is refused, since whoever writes the Secret would otherwise run
// code or read files as meshid-ca.
func RESTConfig(kubeconfig []byte) (*rest.Config, error) {
	kc, err := clientcmd.Load(kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("multicluster: kubeconfig does not parse: %w", err)
	}
	for name, a := range kc.AuthInfos {
		switch {
		case a.Exec != nil:
			return nil, fmt.Errorf("multicluster: kubeconfig user %q runs a command (exec): refused", name)
		case a.AuthProvider != nil:
			return nil, fmt.Errorf("multicluster: kubeconfig user %q uses an auth provider: refused", name)
		case a.TokenFile != "" || a.ClientCertificate != "" || a.ClientKey != "":
			return nil, fmt.Errorf("multicluster: kubeconfig user %q reads a file: put the data in the kubeconfig", name)
		}
	}
	for name, c := range kc.Clusters {
		if c.CertificateAuthority != "" {
			return nil, fmt.Errorf("multicluster: kubeconfig cluster %q reads a file: put certificate-authority-data in the kubeconfig", name)
		}
	}
	cfg, err := clientcmd.NewDefaultClientConfig(*kc, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("multicluster: kubeconfig: %w", err)
	}
	return cfg, nil
}
