package ledger

import (
	"context"
	"database/sql"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Deny records d, replacing an earlier denial of the same identity, and
// appends a 'deny' event to the audit log in the same transaction.
func (l *Ledger) Deny(ctx context.Context, d Denial) error {
	d, err := checkDenial(d)
	if err != nil {
		return err
	}
	tx, err := l.w.BeginTx(ctx, nil)
	if err != nil {
		return unavailable(err)
	}
	defer tx.Rollback()
	at := l.d.timeArg(d.At)
	if _, err := tx.ExecContext(ctx, l.d.rebind(`INSERT INTO denials (spiffe_id, reason, denied_by, denied_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (spiffe_id) DO UPDATE SET reason = excluded.reason, denied_by = excluded.denied_by, denied_at = excluded.denied_at`),
		d.SPIFFEID, d.Reason, d.By, at); err != nil {
		return unavailable(err)
	}
	if err := l.audit(ctx, tx, at, d.By, "deny", d.SPIFFEID, d.Reason); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return unavailable(err)
	}
	return nil
}

// Allow lifts the denial of spiffeID, if there is one, and then appends an
// 'allow' event by by at at to the audit log. wasDenied reports whether
// there was.
func (l *Ledger) Allow(ctx context.Context, spiffeID, by string, at time.Time) (wasDenied bool, err error) {
	if _, err := spiffeid.FromString(spiffeID); err != nil {
		return false, errorf("allow: SPIFFE ID %q: %v", spiffeID, err)
	}
	if by == "" || at.IsZero() {
		return false, errorf("allow %s: who allows and when must be set", spiffeID)
	}
	if len(by) > maxText {
		return false, errorf("allow %s: by is longer than %d bytes", spiffeID, maxText)
	}
	tx, err := l.w.BeginTx(ctx, nil)
	if err != nil {
		return false, unavailable(err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, l.d.rebind("DELETE FROM denials WHERE spiffe_id = ?"), spiffeID)
	if err != nil {
		return false, unavailable(err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, unavailable(err)
	}
	if n == 0 {
		return false, nil
	}
	if err := l.audit(ctx, tx, l.d.timeArg(at), by, "allow", spiffeID, ""); err != nil {
		return false, err
	}
	if err := tx.Commit(); err != nil {
		return false, unavailable(err)
	}
	return true, nil
}

// audit appends one event to admin_events.
func (l *Ledger) audit(ctx context.Context, tx *sql.Tx, at any, actor, action, spiffeID, reason string) error {
	if _, err := tx.ExecContext(ctx, l.d.rebind("INSERT INTO admin_events (at, actor, action, spiffe_id, reason) VALUES (?, ?, ?, ?, ?)"),
		at, actor, action, spiffeID, reason); err != nil {
		return unavailable(err)
	}
	return nil
}

// Denials returns every current denial, sorted by SPIFFE ID.
func (l *Ledger) Denials(ctx context.Context) ([]Denial, error) {
	rows, err := l.r.QueryContext(ctx, "SELECT spiffe_id, reason, denied_by, denied_at FROM denials")
	if err != nil {
		return nil, unavailable(err)
	}
	defer rows.Close()
	var ds []Denial
	for rows.Next() {
		var d Denial
		if err := rows.Scan(&d.SPIFFEID, &d.Reason, &d.By, timeCol{&d.At}); err != nil {
			return nil, unavailable(err)
		}
		ds = append(ds, d)
	}
	if err := rows.Err(); err != nil {
		return nil, unavailable(err)
	}
	// Byte order, whatever the database's collation.
	slices.SortFunc(ds, func(a, b Denial) int { return strings.Compare(a.SPIFFEID, b.SPIFFEID) })
	return ds, nil
}

// pruneChunk bounds the rows one Prune transaction deletes, so that a
// first prune of a large ledger does not hold the writer (and so every
// Record) for long.
const pruneChunk = 1000

// pruneRest is how many times as long as a chunk took Prune waits before
// the next: pruning holds the writer at most a tenth of the time. Without
// it, a first prune of a million expired records (after an upgrade, an
// outage, a shorter --ledger-retention) held SQLite's single writer chunk
// after chunk and issuance fell from 7,000 to 58 certificates a second
// for the minutes it took.
const pruneRest = 9

// Prune deletes the records of certificates whose NotAfter is before
// expiredBefore, and returns how many. It also forgets identities that no
// longer have a certificate and were last issued one before expiredBefore;
// denials and the audit log are kept.
func (l *Ledger) Prune(ctx context.Context, expiredBefore time.Time) (int64, error) {
	if expiredBefore.IsZero() {
		return 0, errorf("prune: expiredBefore is not set")
	}
	cut := l.d.timeArg(expiredBefore)
	var total int64
	for _, table := range l.tables() {
		n, err := l.pruneTable(ctx, table, cut)
		total += n
		if err != nil {
			return total, err
		}
	}
	// Forgotten before and after: an identity written back between the two
	// is written again by the next record that names it.
	l.ids.forget()
	defer l.ids.forget()
	q := "DELETE FROM identities WHERE last_issued < ?"
	for _, table := range l.tables() {
		q += " AND NOT EXISTS (SELECT 1 FROM " + table + " c WHERE c.spiffe_id = identities.spiffe_id)"
	}
	if _, err := l.w.ExecContext(ctx, l.d.rebind(q), cut); err != nil {
		return total, unavailable(err)
	}
	return total, nil
}

// pruneTable deletes the expired records of table in chunks.
func (l *Ledger) pruneTable(ctx context.Context, table string, cut any) (int64, error) {
	var total int64
	for {
		start := time.Now()
		res, err := l.w.ExecContext(ctx, l.d.rebind(`DELETE FROM `+table+` WHERE serial IN (
			SELECT serial FROM `+table+` WHERE not_after < ? LIMIT `+strconv.Itoa(pruneChunk)+`)`), cut)
		if err != nil {
			return total, unavailable(err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, unavailable(err)
		}
		total += n
		took := time.Since(start)
		l.log.Debug("ledger: pruned a chunk", "records", n, "duration", took)
		if n < pruneChunk {
			break
		}
		select {
		case <-ctx.Done():
			return total, ctx.Err()
		case <-time.After(took * pruneRest):
		}
	}
	return total, nil
}
