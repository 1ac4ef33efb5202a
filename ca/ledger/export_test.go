package ledger

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
)

// MigrateTo brings db (of driver "sqlite" or "postgres") to schema version
// v, as an older meshid-ca left it.
func MigrateTo(ctx context.Context, driver string, db *sql.DB, v int) error {
	d := sqliteDialect
	if driver == "postgres" {
		d = postgresDialect
	}
	return migrateTo(ctx, d, db, slog.New(slog.DiscardHandler), v)
}

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
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if l.newTable() != "certificates" {
		return l.move(ctx)
	}
	return nil
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

// Move carries SQLite's recent records into the indexed table now.
func Move(ctx context.Context, l *Ledger) error { return l.move(ctx) }

// InRecent counts the records not moved yet.
func InRecent(ctx context.Context, l *Ledger) (n int, err error) {
	err = l.r.QueryRowContext(ctx, "SELECT COUNT(*) FROM recent").Scan(&n)
	return n, err
}
