package k8sauth

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// Object is what a token check needs of the pod or service account a token
// is bound to.
type Object struct {
	UID     string
	Deleted time.Time // deletionTimestamp; zero while the object is not being deleted
}

// ObjectSource looks up pods and service accounts. Fresh says whether its
// answers can be trusted now; when it cannot, tokens go to a TokenReview.
type ObjectSource interface {
	Pod(namespace, name string) (Object, bool)
	ServiceAccount(namespace, name string) (Object, bool)
	Fresh() bool
}

// Objects watches the cluster's pods and service accounts, keeping of each
// only its name, UID and deletion time (a few hundred bytes per pod,
// however large the pod). Its answers are as fresh as the watches: it says
// it is not [Objects.Fresh] until both are listed, while either watch is
// down, and when the API server has not answered a probe for StaleAfter.
type Objects struct {
	pods, sas cache.SharedIndexInformer
	watching  [2]atomic.Int32 // watches open, per informer
	lastProbe atomic.Int64    // Unix nanoseconds of the last probe the API server answered
	now       func() time.Time
}

// Probing: /readyz every probeInterval; answers are trusted for staleAfter
// after the last one the API server gave. A watch that breaks is noticed at
// once; the probe bounds what a silent network partition can hide. One slow
// or failed probe is not the API server gone (a busy one can take more
// than probeTimeout): only staleAfter without an answer is.
const (
	probeInterval = time.Second
	probeTimeout  = time.Second
	staleAfter    = 3 * time.Second
)

var (
	podsResource            = schema.GroupVersionResource{Version: "v1", Resource: "pods"}
	serviceAccountsResource = schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}
)

// WatchObjects starts watching pods and service accounts through md (the
// metadata API: no pod specs cross the wire) and probing the API server
// through probe, until ctx ends. It returns at once; the lists arrive in the
// background.
func WatchObjects(ctx context.Context, md metadata.Interface, probe rest.Interface, metrics *Metrics, log *slog.Logger) *Objects {
	o := &Objects{now: time.Now}
	o.pods = o.informer(md, podsResource, &o.watching[0])
	o.sas = o.informer(md, serviceAccountsResource, &o.watching[1])
	go o.pods.RunWithContext(ctx)
	go o.sas.RunWithContext(ctx)
	go o.probe(ctx, probe, metrics, log)
	return o
}

func (o *Objects) informer(md metadata.Interface, gvr schema.GroupVersionResource, watching *atomic.Int32) cache.SharedIndexInformer {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return md.Resource(gvr).List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			w, err := md.Resource(gvr).Watch(ctx, opts)
			if err != nil {
				return nil, err
			}
			return trackWatch(w, watching), nil
		},
	}
	inf := cache.NewSharedIndexInformerWithOptions(lw, &metav1.PartialObjectMetadata{}, cache.SharedIndexInformerOptions{
		ObjectDescription: gvr.Resource + " (metadata)",
	})
	inf.SetTransform(trimMetadata)
	return inf
}

// trimMetadata keeps what a token check reads and what the informer needs.
func trimMetadata(obj any) (any, error) {
	m, ok := obj.(*metav1.PartialObjectMetadata)
	if !ok {
		return obj, nil // a tombstone: DeletedFinalStateUnknown
	}
	return &metav1.PartialObjectMetadata{
		TypeMeta: m.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name: m.Name, Namespace: m.Namespace, UID: m.UID,
			ResourceVersion: m.ResourceVersion, DeletionTimestamp: m.DeletionTimestamp,
		},
	}, nil
}

// trackWatch passes w's events on and counts it in open until it ends, so
// a broken watch (an API server that went away) is known at once. A count,
// not a flag: the reflector may open the next watch before the goroutine
// of the one it stopped has finished.
func trackWatch(w watch.Interface, open *atomic.Int32) watch.Interface {
	t := &trackedWatch{inner: w, out: make(chan watch.Event), stop: make(chan struct{})}
	open.Add(1)
	go func() {
		defer close(t.out)
		defer open.Add(-1)
		for {
			select {
			case ev, ok := <-w.ResultChan():
				if !ok {
					return
				}
				select {
				case t.out <- ev:
				case <-t.stop:
					return
				}
			case <-t.stop:
				return
			}
		}
	}()
	return t
}

type trackedWatch struct {
	inner watch.Interface
	out   chan watch.Event
	stop  chan struct{}
	once  sync.Once
}

func (t *trackedWatch) ResultChan() <-chan watch.Event { return t.out }

func (t *trackedWatch) Stop() {
	t.once.Do(func() {
		close(t.stop)
		t.inner.Stop()
	})
}

func (o *Objects) probe(ctx context.Context, c rest.Interface, metrics *Metrics, log *slog.Logger) {
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	wasFresh, warned := false, false
	start := o.now()
	for {
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		_, err := c.Get().AbsPath("/readyz").DoRaw(pctx)
		cancel()
		if err == nil {
			o.lastProbe.Store(o.now().UnixNano())
		}
		fresh := o.Fresh()
		metrics.setOffline(fresh)
		switch {
		case log == nil:
		case fresh && !wasFresh:
			log.Info("tokens are verified offline: the cluster's pods and service accounts are watched and the API server answers")
		case !fresh && wasFresh:
			log.Warn("tokens go to TokenReview: "+o.notFresh(), "probe_error", err)
		case !fresh && !warned && o.now().Sub(start) > time.Minute:
			// Never fresh since the start: most likely RBAC.
			log.Warn("tokens still go to TokenReview a minute after start: "+o.notFresh()+
				"; meshid-ca's service account needs list and watch on pods and serviceaccounts", "probe_error", err)
			warned = true
		}
		wasFresh = fresh
		select {
		case <-ctx.Done():
			metrics.setOffline(false)
			return
		case <-t.C:
		}
	}
}

// Fresh says whether both lists arrived, both watches are open, and the API
// server answered a probe within staleAfter.
func (o *Objects) Fresh() bool {
	last := o.lastProbe.Load()
	return last != 0 && o.now().Sub(time.Unix(0, last)) < staleAfter &&
		o.watching[0].Load() > 0 && o.watching[1].Load() > 0 &&
		o.pods.HasSynced() && o.sas.HasSynced()
}

// notFresh says why Fresh is false.
func (o *Objects) notFresh() string {
	switch {
	case !o.pods.HasSynced() || !o.sas.HasSynced():
		return "pods or service accounts not listed yet"
	case o.watching[0].Load() == 0 || o.watching[1].Load() == 0:
		return "a watch of pods or service accounts is down"
	}
	return "the API server does not answer /readyz"
}

// Synced says whether the first lists of pods and service accounts arrived.
func (o *Objects) Synced() bool { return o.pods.HasSynced() && o.sas.HasSynced() }

// Pod looks a pod up.
func (o *Objects) Pod(namespace, name string) (Object, bool) {
	return lookupObject(o.pods, namespace, name)
}

// ServiceAccount looks a service account up.
func (o *Objects) ServiceAccount(namespace, name string) (Object, bool) {
	return lookupObject(o.sas, namespace, name)
}

func lookupObject(inf cache.SharedIndexInformer, namespace, name string) (Object, bool) {
	v, ok, err := inf.GetStore().GetByKey(namespace + "/" + name)
	if err != nil || !ok {
		return Object{}, false
	}
	m, ok := v.(*metav1.PartialObjectMetadata)
	if !ok {
		return Object{}, false
	}
	obj := Object{UID: string(m.UID)}
	if m.DeletionTimestamp != nil {
		obj.Deleted = m.DeletionTimestamp.Time
	}
	return obj, true
}
