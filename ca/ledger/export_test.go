package ledger

import (
	"context"
	"errors"
)

// BulkInsert is the tests' and benchmarks' fast path: recs in one
// transaction, without the commit loop.
func BulkInsert(ctx context.Context, l *Ledger, recs []Record) error {
	for i := range recs {
		r, err := normalize(recs[i])
		if err != nil {
			return err
		}
		recs[i] = r
	}
	errs, err := l.insert(ctx, recs)
	if err != nil {
		return err
	}
	return errors.Join(errs...)
}

// SchemaVersion keys the benchmarks' cached database.
const SchemaVersion = schemaVersion

// MarkBusy makes l behave as under load: its last commit carried n
// records.
func MarkBusy(l *Ledger, n int) {
	l.mu.Lock()
	l.lastBatch = n
	l.mu.Unlock()
}

// Queued is how many records wait for a commit that has not started.
func Queued(l *Ledger) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.queue)
}
