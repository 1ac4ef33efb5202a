package agent

// watchers announces a change two ways: a channel closed at the next change,
// for loops that wait on it, and functions called at every change, for
// servers that push to many streams without a waiting goroutine for each.
// Its owner's lock guards it.
type watchers struct {
	changed chan struct{}
	funcs   map[uint64]func()
	next    uint64
}

func newWatchers() watchers { return watchers{changed: make(chan struct{})} }

func (w *watchers) add(f func()) uint64 {
	if w.funcs == nil {
		w.funcs = map[uint64]func(){}
	}
	w.next++
	w.funcs[w.next] = f
	return w.next
}

func (w *watchers) remove(id uint64) { delete(w.funcs, id) }

// fire closes the channel and calls every function. The functions run with
// the owner's lock held, so they must return at once and not call back
// into the owner.
func (w *watchers) fire() {
	close(w.changed)
	w.changed = make(chan struct{})
	for _, f := range w.funcs {
		f()
	}
}
