package ledger_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/internal/poll"
)

// TestCommitDelayIdleCommitsAtOnce: on an idle ledger a lone record does not
// wait out the commit delay, however long it is.
func TestCommitDelayIdleCommitsAtOnce(t *testing.T) {
	db := newSQLite(t)
	cfg := db.config()
	cfg.CommitDelay = time.Hour
	l := db.openWith(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.Record(ctx, rec(1)); err != nil {
		t.Fatalf("a lone record on an idle ledger: %v", err)
	}
	if got, err := l.Certificate(ctx, rec(1).Serial); err != nil || got.Serial != rec(1).Serial {
		t.Fatalf("not stored: %v", err)
	}
}

// TestCommitDelayGroupsUnderLoad: under load a commit waits for the records
// that follow its first, and they share it; Close commits what waits at
// once rather than after the delay.
func TestCommitDelayGroupsUnderLoad(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		cfg := db.config()
		cfg.CommitDelay = time.Hour
		l, err := ledger.Open(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ledger.MarkBusy(l, 2)
		before := l.Stats()
		errs := make(chan error, 2)
		for i, want := range []int{1, 2} {
			go func() { errs <- l.Record(context.Background(), rec(10+i)) }()
			poll.Until(t, "the record to queue", func() bool { return ledger.Queued(l) == want })
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := <-errs; err != nil {
				t.Errorf("Record: %v", err)
			}
		}
		after := l.Stats()
		if commits, records := after.Commits-before.Commits, after.Records-before.Records; commits != 1 || records != 2 {
			t.Errorf("%d commits carried %d records, want 1 carrying 2", commits, records)
		}
		l2 := db.open(t)
		for _, i := range []int{10, 11} {
			if _, err := l2.Certificate(context.Background(), rec(i).Serial); err != nil {
				t.Errorf("record %d after Close: %v", i, err)
			}
		}
	})
}

// TestIdentityWrittenOncePerRefresh: the identities table is written when
// an identity is first recorded, not with every certificate after it (one
// page write fewer per certificate), yet Identities reports the newest
// issuance exactly.
func TestIdentityWrittenOncePerRefresh(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		ctx := context.Background()
		older, newer := rec(2), rec(1)
		record(t, l, older)
		record(t, l, newer)
		var stored int64
		if err := db.raw(t).QueryRow("SELECT COUNT(*) FROM identities WHERE spiffe_id = '" + older.SPIFFEID + "'").Scan(&stored); err != nil || stored != 1 {
			t.Fatalf("identities rows: %d, %v", stored, err)
		}
		if db.driver == "sqlite" {
			var lastIssued int64
			if err := db.raw(t).QueryRow("SELECT last_issued FROM identities").Scan(&lastIssued); err != nil {
				t.Fatal(err)
			}
			if lastIssued != older.IssuedAt.UnixMicro() {
				t.Errorf("the second certificate rewrote the identity's row (last_issued %d, first written %d)", lastIssued, older.IssuedAt.UnixMicro())
			}
		}
		ids, err := l.Identities(ctx, "", newer.NotBefore.Add(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != 1 || !ids[0].LastIssued.Equal(newer.IssuedAt) || ids[0].ValidCerts != 2 {
			t.Errorf("Identities = %+v, want last issued %s and 2 valid", ids, newer.IssuedAt)
		}
	})
}

// TestPruneLeavesTheWriterToRecords: a prune of a large backlog (after an
// upgrade, an outage, a shorter retention) rests between its chunks, so
// certificates keep being recorded while it runs instead of one between
// chunks.
func TestPruneLeavesTheWriterToRecords(t *testing.T) {
	db := newSQLite(t)
	l := db.open(t)
	ctx := context.Background()
	const backlog = 2_500
	old := make([]ledger.Record, backlog)
	for i := range old {
		old[i] = rec(100_000+i, func(r *ledger.Record) { r.NotAfter = r.IssuedAt.Add(time.Minute) })
	}
	if err := ledger.BulkInsert(ctx, l, old); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		n, err := l.Prune(ctx, us(t0).Add(time.Hour))
		if err == nil && n != backlog {
			err = fmt.Errorf("pruned %d, want %d", n, backlog)
		}
		done <- err
	}()
	recorded := 0
	for i := 0; ; i++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			// Three chunks: with no rest between them, a record got in
			// only between two chunks (4 while 5,000-row chunks of a
			// 10,000-record backlog ran back to back).
			if recorded < 10 {
				t.Errorf("%d records committed while Prune ran, want at least 10", recorded)
			}
			return
		default:
		}
		if err := l.Record(ctx, rec(i, func(r *ledger.Record) { r.IssuedAt, r.NotBefore, r.NotAfter = us(t0), us(t0), us(t0).Add(24*time.Hour) })); err != nil {
			t.Fatal(err)
		}
		recorded++
	}
}

// TestRecordsReadableBeforeAndAfterTheMove: SQLite records first land in
// a small unindexed table and are moved into the indexed one in large
// transactions; every read sees them, in order, on either side, and a
// serial is unique across both.
func TestRecordsReadableBeforeAndAfterTheMove(t *testing.T) {
	db := newSQLite(t)
	l := db.open(t)
	ctx := context.Background()
	// 1..3 moved, 4..6 not yet (one commit each, then a move of 1..3).
	for i := 1; i <= 3; i++ {
		record(t, l, rec(i))
	}
	if err := ledger.Move(ctx, l); err != nil {
		t.Fatal(err)
	}
	for i := 4; i <= 6; i++ {
		record(t, l, rec(i))
	}
	if n, err := ledger.InRecent(ctx, l); err != nil || n == 0 {
		t.Fatalf("records not yet moved: %d, %v; the test needs some", n, err)
	}
	check := func(when string) {
		t.Helper()
		// Newest first across both tables, paged two at a time.
		want := []string{rec(1).Serial, rec(2).Serial, rec(3).Serial, rec(4).Serial, rec(5).Serial, rec(6).Serial}
		var got []string
		f := ledger.Filter{Limit: 2}
		for {
			p, err := l.Certificates(ctx, f)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, serials(p.Records)...)
			if p.Next == "" {
				break
			}
			f.PageToken = p.Next
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: pages %v, want %v", when, got, want)
		}
		for i := 1; i <= 6; i++ {
			if _, err := l.Certificate(ctx, rec(i).Serial); err != nil {
				t.Errorf("%s: Certificate(%d): %v", when, i, err)
			}
		}
		at := rec(1).NotBefore.Add(time.Second)
		ids, err := l.Identities(ctx, "demo", at)
		if err != nil || len(ids) != 1 || !ids[0].LastIssued.Equal(rec(1).IssuedAt) {
			t.Errorf("%s: Identities = %+v, %v; want last issued %s", when, ids, err, rec(1).IssuedAt)
		}
		if n, _, err := l.Outstanding(ctx, rec(1).IssuedAt.Add(time.Second), at); err != nil || n == 0 {
			t.Errorf("%s: Outstanding = %d, %v", when, n, err)
		}
		// The same record again is accepted; another under a stored serial
		// is refused, wherever the first one is.
		for _, i := range []int{2, 5} {
			if err := l.Record(ctx, rec(i)); err != nil {
				t.Errorf("%s: recording %d again: %v", when, i, err)
			}
			other := rec(i, func(r *ledger.Record) { r.PodName = "someone-else" })
			if err := l.Record(ctx, other); err == nil {
				t.Errorf("%s: a different record under serial %s was accepted", when, other.Serial)
			}
		}
	}
	check("before the move")
	if err := ledger.Move(ctx, l); err != nil {
		t.Fatal(err)
	}
	if n, err := ledger.InRecent(ctx, l); err != nil || n != 0 {
		t.Fatalf("after the move %d records left, %v", n, err)
	}
	check("after the move")
	if got := db.count(t, "certificates"); got != 6 {
		t.Errorf("%d records in certificates, want 6", got)
	}
}
