package ledger

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// pending is one Record call waiting for its commit.
type pending struct {
	r      Record
	queued time.Time
	done   chan error // buffered: the loop never waits for a caller that left
}

var errClosed = fmt.Errorf("%w: the ledger is closed", ErrUnavailable)

// Record stores r durably and returns once it is committed, or with an error
// wrapping ErrUnavailable if the database failed. A record that is not valid
// (serial, SPIFFE ID, times) is refused with an error that does not wrap
// ErrUnavailable, and nothing is written.
//
// If ctx ends first, Record returns ctx's error, and r may still be
// committed: a caller that retries the same Record gets nil. A serial
// already recorded for a different certificate is refused for that record
// alone; the others committed with it are unaffected.
func (l *Ledger) Record(ctx context.Context, r Record) error {
	r, err := normalize(r)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	p := &pending{r: r, queued: time.Now(), done: make(chan error, 1)}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return errClosed
	}
	l.queue = append(l.queue, p)
	l.mu.Unlock()
	l.cond.Signal()
	select {
	case err := <-p.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// commitLoop commits batches until the ledger is closed and its queue empty.
// A batch is whatever queued while the previous commit ran, so a lone
// record is committed at once and a crowd shares one fsync.
func (l *Ledger) commitLoop() {
	defer close(l.loopDone)
	for {
		batch := l.next()
		if batch == nil {
			return
		}
		recs := make([]Record, len(batch))
		for i, p := range batch {
			recs[i] = p.r
		}
		ctx, cancel := context.WithTimeout(context.Background(), commitTimeout)
		start := time.Now()
		errs, err := l.insert(ctx, recs)
		cancel()
		if err != nil {
			err = unavailable(err)
			l.log.Error("ledger: commit failed", "records", len(batch), "first_serial", recs[0].Serial, "error", err)
		} else {
			l.commits.Add(1)
			l.records.Add(int64(len(batch)))
			l.log.Debug("ledger: committed", "records", len(batch), "duration", time.Since(start))
		}
		l.answerBatch(batch, errs, err)
		if l.newTable() != "certificates" && l.moveDue(len(batch), err == nil) {
			if err := l.move(context.Background()); err != nil {
				l.log.Error("ledger: moving records into the indexed table failed; they stay readable where they are", "error", err)
			}
		}
	}
}

// moveEvery and moveAfter: the commit loop moves records from recent to
// certificates once this many are there, or when the oldest has waited
// this long and another commit comes. Records in recent are as durable and
// as readable as in certificates; recent only has no index but its key, so
// inserting there costs a few pages a commit, and the index inserts happen
// in one large transaction per move instead of in every commit that
// requests wait on.
const (
	moveEvery = 2000
	moveAfter = time.Second
)

// move carries every record of recent into certificates in one
// transaction. Only the commit loop (or a test, with no loop running
// writes) calls it: SQLite has one writer, so nothing lands in recent
// between the copy and the delete.
func (l *Ledger) move(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, commitTimeout)
	defer cancel()
	tx, err := l.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "INSERT INTO certificates ("+certColumns+") SELECT "+certColumns+" FROM recent WHERE true ON CONFLICT (serial) DO NOTHING"); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, "DELETE FROM recent"); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	l.mu.Lock()
	l.hot, l.lastMove = 0, time.Now()
	l.mu.Unlock()
	return nil
}

// moveDue counts a committed batch of n records and says whether recent
// should be moved now.
func (l *Ledger) moveDue(n int, committed bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if committed {
		l.hot += n
	}
	return l.hot >= moveEvery || (l.hot > 0 && time.Since(l.lastMove) > moveAfter)
}

// answerBatch tells each caller of batch how its record fared: err for
// all of them, or else its own errs[i].
func (l *Ledger) answerBatch(batch []*pending, errs []error, err error) {
	for i, p := range batch {
		e := err
		if e == nil {
			e = errs[i]
		}
		if e != nil && err == nil {
			l.log.Error("ledger: record refused", "serial", p.r.Serial, "spiffe_id", p.r.SPIFFEID, "error", e)
		}
		p.done <- e
	}
}

// next waits for queued records and takes up to maxBatch of them; nil means
// the ledger is closed and nothing is left.
func (l *Ledger) next() []*pending {
	l.mu.Lock()
	defer l.mu.Unlock()
	for len(l.queue) == 0 && !l.closed {
		l.cond.Wait()
	}
	// Under load, a commit of few records waits (until its first record has
	// waited commitDelay) for more to share its fsync and page writes. A
	// lone record on an idle CA is committed at once, and so is a batch
	// that gathered while the last commit ran (a database whose commits
	// are slow, such as PostgreSQL over a network, batches by itself).
	if len(l.queue) > 0 && len(l.queue) < targetBatch && l.lastBatch >= 2 && l.commitDelay > 0 {
		deadline := l.queue[0].queued.Add(l.commitDelay)
		if wait := time.Until(deadline); wait > 0 {
			timer := time.AfterFunc(wait, l.cond.Broadcast)
			for len(l.queue) < targetBatch && !l.closed && time.Now().Before(deadline) {
				l.cond.Wait()
			}
			timer.Stop()
		}
	}
	n := min(len(l.queue), l.maxBatch)
	if n == 0 {
		return nil
	}
	l.lastBatch = n
	batch := l.queue[:n:n]
	l.queue = l.queue[n:]
	if len(l.queue) == 0 {
		l.queue = nil
	}
	return batch
}

// targetBatch is a commit's size beyond which waiting for more records
// saves little: the commit's fixed cost (fsync, WAL header, statements) is
// then a small part of its records'.
const targetBatch = 32

// rowsPerInsert keeps one INSERT's parameters (14 per row) well below the
// limits of SQLite (32766) and PostgreSQL (65535).
const rowsPerInsert = 500

// maxStmtRows is the largest multi-row INSERT the commit loop prepares once
// and keeps; batches are cut into chunks of a power of two rows up to it,
// so at most nine statements of each kind are ever prepared. Parsing a
// fresh statement for every batch cost an eighth of the ledger's CPU.
const maxStmtRows = 256

// powerChunks cuts s into chunks whose lengths are powers of two, largest
// first, none above maxStmtRows.
func powerChunks[T any](s []T) [][]T {
	var out [][]T
	for len(s) > 0 {
		n := maxStmtRows
		for n > len(s) {
			n /= 2
		}
		out = append(out, s[:n])
		s = s[n:]
	}
	return out
}

// stmtCache holds the commit loop's prepared statements by text. Only the
// commit loop uses it.
type stmtCache map[string]*sql.Stmt

// prepare makes sure every statement in qs is prepared on l.w. It runs
// before the transaction: SQLite's writer has one connection, which the
// transaction then holds.
func (l *Ledger) prepare(ctx context.Context, qs []string) error {
	for _, q := range qs {
		if _, ok := l.stmts[q]; ok {
			continue
		}
		st, err := l.w.PrepareContext(ctx, q)
		if err != nil {
			return err
		}
		l.stmts[q] = st
	}
	return nil
}

// newTable is where new records are inserted: for SQLite the small
// unindexed table the commit loop moves them out of (see move).
func (l *Ledger) newTable() string {
	if l.d == sqliteDialect {
		return "recent"
	}
	return "certificates"
}

// certInsert and identityUpsert are the commit loop's statements for a
// number of rows; their texts are made once.
func (l *Ledger) certInsert(rows int) string {
	q, ok := l.texts[-rows]
	if !ok {
		q = l.d.rebind("INSERT INTO " + l.newTable() + " (" + certColumns + ") VALUES " + values(rows, certColumnCount) +
			" ON CONFLICT (serial) DO NOTHING RETURNING serial")
		l.texts[-rows] = q
	}
	return q
}

func (l *Ledger) identityUpsert(rows int) string {
	q, ok := l.texts[rows]
	if !ok {
		q = l.d.rebind("INSERT INTO identities (spiffe_id, namespace, service_account, first_issued, last_issued) VALUES " + values(rows, 5) +
			" ON CONFLICT (spiffe_id) DO UPDATE SET" +
			" first_issued = " + l.d.least + "(identities.first_issued, excluded.first_issued)," +
			" last_issued = " + l.d.greatest + "(identities.last_issued, excluded.last_issued)")
		l.texts[rows] = q
	}
	return q
}

// statements lists the statements a batch of n distinct records may need:
// its certificate chunks, and identity chunks of every size up to n (how
// many identities it holds is known only inside the transaction).
func (l *Ledger) statements(n int) []string {
	var qs []string
	for _, c := range powerChunks(make([]struct{}, n)) {
		qs = append(qs, l.certInsert(len(c)))
	}
	for size := 1; size <= min(n, maxStmtRows); size *= 2 {
		qs = append(qs, l.identityUpsert(size))
	}
	return qs
}

// certColumnCount is how many columns certColumns names.
const certColumnCount = 14

const certColumns = "serial, spiffe_id, namespace, service_account, pod_name, pod_uid, cluster_id, public_key_sha256, not_before, not_after, issuer_fingerprint, auth_method, issued_at, requested_by"

func (l *Ledger) certArgs(args []any, r *Record) []any {
	return append(args, r.Serial, r.SPIFFEID, r.Namespace, r.ServiceAccount, r.PodName, r.PodUID, r.ClusterID,
		r.PublicKeySHA256, l.d.timeArg(r.NotBefore), l.d.timeArg(r.NotAfter), r.IssuerFingerprint, r.AuthMethod, l.d.timeArg(r.IssuedAt), r.RequestedBy)
}

// values is "(?, ?, …), (…)…": rows groups of cols placeholders.
func values(rows, cols int) string {
	row := "(" + strings.Repeat("?, ", cols-1) + "?)"
	return strings.Repeat(row+", ", rows-1) + row
}

// insert writes recs and the identities they name in one transaction. err
// is a database failure, for all of recs; otherwise errs[i] says why recs[i]
// alone was refused (its serial is recorded for another certificate).
func (l *Ledger) insert(ctx context.Context, recs []Record) (errs []error, err error) {
	// A serial twice in one batch is inserted once; the copies are then
	// judged like serials already in the database.
	first := make(map[string]int, len(recs))
	unique := make([]*Record, 0, len(recs))
	for i := range recs {
		if _, dup := first[recs[i].Serial]; !dup {
			first[recs[i].Serial] = i
			unique = append(unique, &recs[i])
		}
	}
	if err := l.prepare(ctx, l.statements(len(unique))); err != nil {
		return nil, err
	}
	tx, err := l.w.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()

	// stored: what the database holds for each serial of the batch, once
	// it is known. With SQLite, a serial already moved into certificates is
	// not inserted into recent again, only compared below.
	stored := make(map[string]Record, len(unique))
	toInsert := unique
	if l.newTable() != "certificates" {
		serials := make([]string, len(unique))
		for i, r := range unique {
			serials[i] = r.Serial
		}
		if err := l.fetch(ctx, tx, "certificates", serials, stored); err != nil {
			return nil, err
		}
		if len(stored) > 0 {
			toInsert = slices.DeleteFunc(slices.Clone(unique), func(r *Record) bool { _, ok := stored[r.Serial]; return ok })
		}
	}
	inserted := make(map[string]bool, len(toInsert))
	for _, chunk := range powerChunks(toInsert) {
		args := make([]any, 0, len(chunk)*certColumnCount)
		for _, r := range chunk {
			args = l.certArgs(args, r)
		}
		if err := l.collect(ctx, tx, l.certInsert(len(chunk)), args, inserted); err != nil {
			return nil, err
		}
	}
	written, err := l.upsertIdentities(ctx, tx, unique, inserted)
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, r := range toInsert {
		if inserted[r.Serial] {
			stored[r.Serial] = *r
		} else {
			missing = append(missing, r.Serial)
		}
	}
	if len(missing) > 0 {
		if err := l.fetch(ctx, tx, l.newTable(), missing, stored); err != nil {
			return nil, err
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	l.ids.remember(written)
	errs = make([]error, len(recs))
	for i, r := range recs {
		if s, ok := stored[r.Serial]; !ok || !sameRecord(s, r) {
			errs[i] = errorf("record %s: the serial is already recorded for another certificate", r.Serial)
		}
	}
	return errs, nil
}

// collect runs an INSERT … RETURNING serial and adds the serials to set.
func (l *Ledger) collect(ctx context.Context, tx *sql.Tx, q string, args []any, set map[string]bool) error {
	rows, err := tx.StmtContext(ctx, l.stmts[q]).QueryContext(ctx, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return err
		}
		set[s] = true
	}
	return rows.Err()
}

// upsertIdentities records the identities of the inserted records that
// the ledger has not written lately (see identityCache), in SPIFFE ID order
// so that replicas writing one PostgreSQL lock rows in the same order and
// cannot deadlock. It returns the identities it wrote.
func (l *Ledger) upsertIdentities(ctx context.Context, tx *sql.Tx, recs []*Record, inserted map[string]bool) ([]string, error) {
	type span struct {
		ns, sa      string
		first, last time.Time
	}
	ids := make(map[string]*span)
	now := time.Now()
	for _, r := range recs {
		if !inserted[r.Serial] || l.ids.fresh(r.SPIFFEID, now) {
			continue
		}
		s, ok := ids[r.SPIFFEID]
		if !ok {
			ids[r.SPIFFEID] = &span{ns: r.Namespace, sa: r.ServiceAccount, first: r.IssuedAt, last: r.IssuedAt}
			continue
		}
		if r.IssuedAt.Before(s.first) {
			s.first = r.IssuedAt
		}
		if r.IssuedAt.After(s.last) {
			s.last = r.IssuedAt
		}
	}
	keys := make([]string, 0, len(ids))
	for k := range ids {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, chunk := range powerChunks(keys) {
		args := make([]any, 0, len(chunk)*5)
		for _, k := range chunk {
			s := ids[k]
			args = append(args, k, s.ns, s.sa, l.d.timeArg(s.first), l.d.timeArg(s.last))
		}
		if _, err := tx.StmtContext(ctx, l.stmts[l.identityUpsert(len(chunk))]).ExecContext(ctx, args...); err != nil {
			return nil, err
		}
	}
	return keys, nil
}

// identityRefresh is how long the commit loop trusts that an identity it
// wrote is still in the identities table. Within it, certificates of that
// identity are inserted without touching the table: one row and index page
// fewer per certificate, a fifth of the ledger's page writes. The table's
// last_issued is then at most this stale; Identities reads the exact time
// off the certificates, and a Prune (of identities with no certificate
// left) forgets what the cache holds.
const identityRefresh = 10 * time.Minute

// maxCachedIdentities bounds the cache; past it, it starts afresh.
const maxCachedIdentities = 1 << 17

// identityCache holds the identities the commit loop wrote, and when.
type identityCache struct {
	mu      sync.Mutex
	written map[string]time.Time
}

func (c *identityCache) fresh(id string, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.written[id]
	return ok && now.Sub(at) < identityRefresh
}

func (c *identityCache) remember(ids []string) {
	if len(ids) == 0 {
		return
	}
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.written == nil || len(c.written)+len(ids) > maxCachedIdentities {
		c.written = make(map[string]time.Time, len(ids))
	}
	for _, id := range ids {
		c.written[id] = now
	}
}

// forget empties the cache: identities may have left the table.
func (c *identityCache) forget() {
	c.mu.Lock()
	c.written = nil
	c.mu.Unlock()
}

// fetch reads the records of serials stored in table into m.
func (l *Ledger) fetch(ctx context.Context, tx *sql.Tx, table string, serials []string, m map[string]Record) error {
	for chunk := range slices.Chunk(serials, rowsPerInsert) {
		args := make([]any, len(chunk))
		for i, s := range chunk {
			args[i] = s
		}
		q := "SELECT " + certColumns + " FROM " + table + " WHERE serial IN (" + strings.TrimSuffix(strings.Repeat("?, ", len(chunk)), ", ") + ")"
		rows, err := tx.QueryContext(ctx, l.d.rebind(q), args...)
		if err != nil {
			return err
		}
		for rows.Next() {
			r, err := scanRecord(rows)
			if err != nil {
				rows.Close()
				return err
			}
			m[r.Serial] = r
		}
		err = errors.Join(rows.Err(), rows.Close())
		if err != nil {
			return err
		}
	}
	return nil
}

// sameRecord reports whether a and b describe the same certificate.
func sameRecord(a, b Record) bool {
	return a.Serial == b.Serial && a.SPIFFEID == b.SPIFFEID && a.Namespace == b.Namespace &&
		a.ServiceAccount == b.ServiceAccount && a.PodName == b.PodName && a.PodUID == b.PodUID &&
		a.ClusterID == b.ClusterID && a.PublicKeySHA256 == b.PublicKeySHA256 &&
		a.NotBefore.Equal(b.NotBefore) && a.NotAfter.Equal(b.NotAfter) &&
		a.IssuerFingerprint == b.IssuerFingerprint && a.AuthMethod == b.AuthMethod && a.IssuedAt.Equal(b.IssuedAt) &&
		a.RequestedBy == b.RequestedBy
}

// scanner is *sql.Row or *sql.Rows.
type scanner interface{ Scan(dest ...any) error }

func scanRecord(s scanner) (Record, error) {
	var r Record
	err := s.Scan(&r.Serial, &r.SPIFFEID, &r.Namespace, &r.ServiceAccount, &r.PodName, &r.PodUID, &r.ClusterID,
		&r.PublicKeySHA256, timeCol{&r.NotBefore}, timeCol{&r.NotAfter}, &r.IssuerFingerprint, &r.AuthMethod, timeCol{&r.IssuedAt}, &r.RequestedBy)
	return r, err
}
