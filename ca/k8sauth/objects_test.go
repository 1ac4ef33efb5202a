package k8sauth

import (
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/watch"
)

// The reflector may stop a watch and open the next before the stopped
// one's goroutine is done: the count of open watches must end at one, not
// at none (a flag set by the new watch and cleared by the old one would).
func TestTrackWatchCountsOverlappingWatches(t *testing.T) {
	var open atomic.Int32
	old := trackWatch(watch.NewFake(), &open)
	old.Stop()
	next := trackWatch(watch.NewFake(), &open)
	defer next.Stop()
	deadline := time.Now().Add(10 * time.Second)
	for open.Load() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d watches counted open, want 1", open.Load())
		}
		time.Sleep(time.Millisecond) // poll interval
	}
	// A watch that ends on its own (the API server went away) is counted
	// out at once, before its channel closes.
	fake := watch.NewFake()
	ended := trackWatch(fake, &open)
	fake.Stop()
	for range ended.ResultChan() {
	}
	if n := open.Load(); n != 1 {
		t.Errorf("%d watches counted open after one ended, want 1", n)
	}
}
