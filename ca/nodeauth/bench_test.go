package nodeauth

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/meshid/meshid/ca/k8sauth"
)

// BenchmarkAuthorize: one decision with 10,000 pods on 100 nodes in the
// watch (trimmed as Watch keeps them), and what the trimmed pods weigh.
func BenchmarkAuthorize(b *testing.B) {
	const pods, nodes = 10000, 100
	inf := cache.NewSharedIndexInformer(&cache.ListWatch{}, &corev1.Pod{}, 0, cache.Indexers{byNodeAccount: indexNodeAccount})
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range pods {
		full := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("app-%d", i), Namespace: fmt.Sprintf("ns-%d", i%50), UID: types.UID(fmt.Sprintf("uid-%d", i)),
				Labels: map[string]string{"app": "x", "pod-template-hash": "abcdef"}},
			Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%d", i%nodes), ServiceAccountName: fmt.Sprintf("sa-%d", i%500),
				Containers: []corev1.Container{{Name: "app", Image: "registry.example.com/app:1", Args: []string{"--a", "--b"}}}},
		}
		trimmed, _ := trimPod(full)
		if err := inf.GetIndexer().Add(trimmed); err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	inf.GetIndexer().Add(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-7", Namespace: "istio-system", UID: "z7"},
		Spec:       corev1.PodSpec{NodeName: "node-7", ServiceAccountName: "ztunnel"},
	})
	a, err := New("Kubernetes", spiffeid.RequireTrustDomainFromString("cluster.local"), []Account{{Namespace: "istio-system", Name: "ztunnel"}}, synced{&Watcher{inf: inf}})
	if err != nil {
		b.Fatal(err)
	}
	caller := k8sauth.Caller{Namespace: "istio-system", ServiceAccount: "ztunnel", PodName: "ztunnel-7", PodUID: "z7"}
	// app-7 runs as sa-7 in ns-7 on node-7.
	if _, err := a.Authorize(caller, "spiffe://cluster.local/ns/ns-7/sa/sa-7"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := a.Authorize(caller, "spiffe://cluster.local/ns/ns-7/sa/sa-7"); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/pods, "heap-bytes/pod")
}

// synced: the benchmark's informer is filled by hand, never run.
type synced struct{ *Watcher }

func (synced) Synced() bool { return true }
