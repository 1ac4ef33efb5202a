package ledger_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/ledger"
)

// event is a row of admin_events.
type event struct {
	at                              time.Time
	actor, action, spiffeID, reason string
}

func auditLog(tb testing.TB, db testDB) []event {
	tb.Helper()
	rows, err := db.raw(tb).Query("SELECT at, actor, action, spiffe_id, reason FROM admin_events ORDER BY id")
	if err != nil {
		tb.Fatal(err)
	}
	defer rows.Close()
	var out []event
	for rows.Next() {
		var e event
		var at any
		if err := rows.Scan(&at, &e.actor, &e.action, &e.spiffeID, &e.reason); err != nil {
			tb.Fatal(err)
		}
		switch at := at.(type) {
		case int64:
			e.at = time.UnixMicro(at).UTC()
		case time.Time:
			e.at = at.UTC()
		default:
			tb.Fatalf("admin_events.at is %T", at)
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

func TestDenyAllow(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		ctx := context.Background()
		web := "spiffe://cluster.local/ns/demo/sa/web"
		api := "spiffe://cluster.local/ns/demo/sa/api"
		at1, at2, at3, at4 := t0, t0.Add(time.Minute), t0.Add(2*time.Minute), t0.Add(3*time.Minute)

		for _, d := range []ledger.Denial{
			{SPIFFEID: web, Reason: "leaked key", By: "alice", At: at1},
			{SPIFFEID: web, Reason: "still leaked", By: "bob", At: at2}, // replaces the first
			{SPIFFEID: api, Reason: "", By: "alice", At: at3},
		} {
			if err := l.Deny(ctx, d); err != nil {
				t.Fatal(err)
			}
		}
		ds, err := l.Denials(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := []ledger.Denial{
			{SPIFFEID: api, Reason: "", By: "alice", At: us(at3)},
			{SPIFFEID: web, Reason: "still leaked", By: "bob", At: us(at2)},
		}
		if !slices.Equal(ds, want) {
			t.Errorf("Denials = %+v, want %+v", ds, want)
		}

		was, err := l.Allow(ctx, web, "carol", at4)
		if err != nil || !was {
			t.Errorf("Allow(denied) = %v, %v", was, err)
		}
		was, err = l.Allow(ctx, web, "carol", at4)
		if err != nil || was {
			t.Errorf("Allow(not denied) = %v, %v", was, err)
		}
		if ds, _ := l.Denials(ctx); !slices.Equal(ds, want[:1]) {
			t.Errorf("Denials after Allow = %+v", ds)
		}

		wantLog := []event{
			{us(at1), "alice", "deny", web, "leaked key"},
			{us(at2), "bob", "deny", web, "still leaked"},
			{us(at3), "alice", "deny", api, ""},
			{us(at4), "carol", "allow", web, ""},
		}
		if got := auditLog(t, db); !slices.Equal(got, wantLog) {
			t.Errorf("audit log:\n got %+v\nwant %+v", got, wantLog)
		}

		for _, tc := range []struct {
			d   ledger.Denial
			msg string
		}{
			{ledger.Denial{SPIFFEID: "web", By: "a", At: t0}, "SPIFFE ID"},
			{ledger.Denial{SPIFFEID: web, At: t0}, "By"},
			{ledger.Denial{SPIFFEID: web, By: "a"}, "At is not set"},
			{ledger.Denial{SPIFFEID: web, By: "a", At: t0, Reason: strings.Repeat("x", 5000)}, "longer"},
		} {
			err := l.Deny(ctx, tc.d)
			if err == nil || errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Deny(%.80v) = %v, want a refusal saying %q", tc.d, err, tc.msg)
			}
		}
		for _, tc := range []struct {
			id, by string
			at     time.Time
		}{{"nope", "a", t0}, {api, "", t0}, {api, "a", time.Time{}}} {
			if _, err := l.Allow(ctx, tc.id, tc.by, tc.at); err == nil || errors.Is(err, ledger.ErrUnavailable) {
				t.Errorf("Allow(%q, %q, %v) = %v, want a refusal", tc.id, tc.by, tc.at, err)
			}
		}
		if got := auditLog(t, db); len(got) != len(wantLog) {
			t.Errorf("refused calls wrote %d audit events", len(got)-len(wantLog))
		}
		if ds, _ := l.Denials(ctx); !slices.Equal(ds, want[:1]) {
			t.Errorf("refused calls changed the denials: %+v", ds)
		}
	})
}

func TestPrune(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		ctx := context.Background()
		now := us(t0)
		expiring := func(d time.Duration) func(*ledger.Record) {
			return func(r *ledger.Record) {
				r.NotAfter = now.Add(d)
				r.NotBefore = r.NotAfter.Add(-time.Hour)
				r.IssuedAt = r.NotBefore
			}
		}
		old := identity("demo", "old")
		record(t, l,
			rec(1, old, expiring(-3*time.Hour)),
			rec(2, expiring(-2*time.Hour)),
			rec(3, expiring(0)), // NotAfter == cut: kept
			rec(4, expiring(time.Hour)),
		)
		n, err := l.Prune(ctx, now)
		if err != nil {
			t.Fatal(err)
		}
		if n != 2 {
			t.Errorf("Prune = %d, want 2", n)
		}
		if got := serials(all(t, l, ledger.Filter{})); !slices.Equal(got, []string{rec(4).Serial, rec(3).Serial}) {
			t.Errorf("left after Prune: %v", got)
		}
		// demo/old has no certificate left and was last issued before the
		// cut: forgotten. demo/web keeps its summary.
		ids, err := l.Identities(ctx, "", now)
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != 1 || ids[0].SPIFFEID != "spiffe://cluster.local/ns/demo/sa/web" || ids[0].ValidCerts != 1 {
			t.Errorf("Identities after Prune: %s", identities(ids))
		}
		if n, err := l.Prune(ctx, now); err != nil || n != 0 {
			t.Errorf("second Prune = %d, %v", n, err)
		}
		if _, err := l.Prune(ctx, time.Time{}); err == nil {
			t.Error("Prune(zero time) succeeded")
		}
	})
}

// TestPruneMany deletes more rows than one prune transaction holds.
func TestPruneMany(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		rs := make([]ledger.Record, 6000) // two prune transactions
		for i := range rs {
			rs[i] = rec(i)
		}
		if err := ledger.BulkInsert(context.Background(), l, rs); err != nil {
			t.Fatal(err)
		}
		n, err := l.Prune(context.Background(), t0.Add(2*time.Hour))
		if err != nil || n != int64(len(rs)) {
			t.Errorf("Prune = %d, %v; want %d", n, err, len(rs))
		}
		if got := db.records(t); got != 0 {
			t.Errorf("%d left", got)
		}
	})
}
