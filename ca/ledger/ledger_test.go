package ledger_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/ledger"
)

func TestRecordRoundTrip(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		berlin := time.FixedZone("CET", 3600)
		in := ledger.Record{
			Serial:            "7f3a9c0e2b6d4f18a5c3e7091b2d4f6a",
			SPIFFEID:          "spiffe://cluster.local/ns/shop/sa/cart",
			Namespace:         "shop",
			ServiceAccount:    "cart",
			PodName:           "cart-6d4f8b9c7-x2k9p",
			PodUID:            "0b5e3a6c-7f21-4d0e-9a8b-3c2d1e0f4a5b",
			ClusterID:         "east-1",
			PublicKeySHA256:   "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
			NotBefore:         time.Date(2026, 3, 14, 16, 4, 26, 123456789, berlin),
			NotAfter:          time.Date(2026, 3, 15, 16, 9, 26, 999999999, berlin),
			IssuerFingerprint: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
			AuthMethod:        "jwks",
			IssuedAt:          time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.UTC),
		}
		record(t, l, in)
		want := in
		want.NotBefore = time.Date(2026, 3, 14, 15, 4, 26, 123456000, time.UTC)
		want.NotAfter = time.Date(2026, 3, 15, 15, 9, 26, 999999000, time.UTC)
		want.IssuedAt = time.Date(2026, 3, 14, 15, 9, 26, 535897000, time.UTC)

		got, err := l.Certificate(context.Background(), in.Serial)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("Certificate:\n got %+v\nwant %+v", got, want)
		}
		for _, tm := range []time.Time{got.NotBefore, got.NotAfter, got.IssuedAt} {
			if tm.Location() != time.UTC {
				t.Errorf("time %v is in %v, not UTC", tm, tm.Location())
			}
		}
		p, err := l.Certificates(context.Background(), ledger.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		if len(p.Records) != 1 || p.Records[0] != want || p.Next != "" {
			t.Errorf("Certificates = %+v, want just %+v", p, want)
		}
		// Recording the same certificate again (a retry after a timeout)
		// succeeds; another certificate with its serial does not.
		if err := l.Record(context.Background(), in); err != nil {
			t.Errorf("recording the same certificate again: %v", err)
		}
		other := in
		other.PodName = "cart-other"
		err = l.Record(context.Background(), other)
		if err == nil || errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), "already recorded") {
			t.Errorf("recording another certificate with the same serial: %v", err)
		}
		if got, _ := l.Certificate(context.Background(), in.Serial); got != want {
			t.Errorf("after a refused duplicate: %+v", got)
		}
	})
}

func TestRecordRefused(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		for _, tc := range []struct {
			name string
			mod  func(*ledger.Record)
			msg  string
		}{
			{"no serial", func(r *ledger.Record) { r.Serial = "" }, "serial is empty"},
			{"upper-case serial", func(r *ledger.Record) { r.Serial = "ABCD" }, "not lower-case hex"},
			{"serial with colons", func(r *ledger.Record) { r.Serial = "ab:cd" }, "not lower-case hex"},
			{"serial too long", func(r *ledger.Record) { r.Serial = strings.Repeat("a", 41) }, "longer than 40"},
			{"no SPIFFE ID", func(r *ledger.Record) { r.SPIFFEID = "" }, "SPIFFE ID"},
			{"not a SPIFFE ID", func(r *ledger.Record) { r.SPIFFEID = "https://example.com/ns/a/sa/b" }, "SPIFFE ID"},
			{"no NotBefore", func(r *ledger.Record) { r.NotBefore = time.Time{} }, "NotBefore is not set"},
			{"no NotAfter", func(r *ledger.Record) { r.NotAfter = time.Time{} }, "NotAfter is not set"},
			{"no IssuedAt", func(r *ledger.Record) { r.IssuedAt = time.Time{} }, "IssuedAt is not set"},
			{"NotAfter = NotBefore", func(r *ledger.Record) { r.NotAfter = r.NotBefore }, "not after NotBefore"},
			{"NotAfter before NotBefore", func(r *ledger.Record) { r.NotAfter = r.NotBefore.Add(-time.Second) }, "not after NotBefore"},
			{"equal at the microsecond", func(r *ledger.Record) { r.NotAfter = r.NotBefore.Add(500 * time.Nanosecond) }, "not after NotBefore"},
			{"year 1900", func(r *ledger.Record) { r.NotBefore = time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC) }, "outside years"},
			{"bad key hash", func(r *ledger.Record) { r.PublicKeySHA256 = "abc" }, "PublicKeySHA256"},
			{"upper-case fingerprint", func(r *ledger.Record) { r.IssuerFingerprint = strings.Repeat("CD", 32) }, "IssuerFingerprint"},
			{"huge pod name", func(r *ledger.Record) { r.PodName = strings.Repeat("p", 2000) }, "PodName is longer"},
			{"requested by no SPIFFE ID", func(r *ledger.Record) { r.RequestedBy = "istio-system/ztunnel" }, "RequestedBy"},
		} {
			err := l.Record(context.Background(), rec(1, tc.mod))
			if err == nil || errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), tc.msg) || !strings.HasPrefix(err.Error(), "ledger: ") {
				t.Errorf("%s: Record = %v, want a refusal saying %q", tc.name, err, tc.msg)
			}
		}
		if n := db.records(t); n != 0 {
			t.Errorf("%d certificates written", n)
		}
		if n := db.count(t, "identities"); n != 0 {
			t.Errorf("%d identities written", n)
		}
	})
}

func TestCertificateNotFound(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		record(t, l, rec(1))
		if _, err := l.Certificate(context.Background(), "abcdef"); !errors.Is(err, ledger.ErrNotFound) {
			t.Errorf("Certificate(unknown) = %v, want ErrNotFound", err)
		}
		if _, err := l.Certificate(context.Background(), "not hex"); err == nil || errors.Is(err, ledger.ErrNotFound) || errors.Is(err, ledger.ErrUnavailable) {
			t.Errorf("Certificate(not hex) = %v, want a refusal", err)
		}
	})
}

// TestConcurrentRecord records from 64 goroutines at once: all must be
// committed, in fewer commits than records.
func TestConcurrentRecord(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		const workers, each = 64, 10
		var wg sync.WaitGroup
		errs := make(chan error, workers*each)
		for w := range workers {
			wg.Go(func() {
				for i := range each {
					n := w*each + i
					errs <- l.Record(context.Background(), rec(n, identity(fmt.Sprintf("ns-%d", w%4), fmt.Sprintf("sa-%d", w))))
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got := len(all(t, l, ledger.Filter{Limit: 1000})); got != workers*each {
			t.Errorf("%d records stored, want %d", got, workers*each)
		}
		st := l.Stats()
		t.Logf("%d records in %d commits", st.Records, st.Commits)
		if st.Records != workers*each || st.Commits >= st.Records {
			t.Errorf("Stats = %+v: want %d records in fewer commits", st, workers*each)
		}
		ids, err := l.Identities(context.Background(), "", t0)
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != workers {
			t.Errorf("%d identities, want %d", len(ids), workers)
		}
	})
}

// TestClose: what Record acknowledged before Close is kept; Record after
// Close fails.
func TestClose(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l, err := ledger.Open(context.Background(), db.config())
		if err != nil {
			t.Fatal(err)
		}
		var (
			wg    sync.WaitGroup
			mu    sync.Mutex
			acked []string
		)
		for w := range 16 {
			wg.Go(func() {
				for i := 0; ; i++ {
					r := rec(w*100000 + i)
					err := l.Record(context.Background(), r)
					if err != nil {
						if !errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), "closed") {
							t.Errorf("Record while closing: %v", err)
						}
						return
					}
					mu.Lock()
					acked = append(acked, r.Serial)
					mu.Unlock()
				}
			})
		}
		time.Sleep(100 * time.Millisecond)
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		if err := l.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := l.Record(context.Background(), rec(99999)); err == nil {
			t.Error("Record after Close succeeded")
		}

		l = db.open(t)
		stored := serials(all(t, l, ledger.Filter{Limit: 1000}))
		slices.Sort(stored)
		slices.Sort(acked)
		if len(acked) == 0 || !slices.Equal(stored, acked) {
			t.Errorf("acknowledged %d records, %d stored", len(acked), len(stored))
		}
	})
}

func TestRecordContextEnds(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := l.Record(ctx, rec(1)); !errors.Is(err, context.Canceled) {
			t.Errorf("Record(cancelled ctx) = %v", err)
		}
		// The ledger goes on working.
		record(t, l, rec(2))
	})
}

func TestReopen(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l, err := ledger.Open(context.Background(), db.config())
		if err != nil {
			t.Fatal(err)
		}
		record(t, l, rec(1), rec(2))
		if err := l.Deny(context.Background(), ledger.Denial{SPIFFEID: "spiffe://cluster.local/ns/x/sa/y", Reason: "r", By: "admin", At: t0}); err != nil {
			t.Fatal(err)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if db.driver == "sqlite" {
			for _, name := range []string{db.dsn, db.dsn + "-wal", db.dsn + "-shm"} {
				st, err := os.Stat(name)
				if os.IsNotExist(err) && name != db.dsn {
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				if st.Mode().Perm() != 0o600 {
					t.Errorf("%s has mode %v, want 0600", filepath.Base(name), st.Mode().Perm())
				}
			}
		}
		l = db.open(t)
		if err := l.Ping(context.Background()); err != nil {
			t.Fatal(err)
		}
		if got := serials(all(t, l, ledger.Filter{})); !slices.Equal(got, []string{rec(1).Serial, rec(2).Serial}) {
			t.Errorf("after reopening: %v", got)
		}
		if ds, err := l.Denials(context.Background()); err != nil || len(ds) != 1 {
			t.Errorf("Denials after reopening = %v, %v", ds, err)
		}
		if n := db.count(t, "schema_migrations"); n != ledger.SchemaVersion {
			t.Errorf("%d rows in schema_migrations, want %d", n, ledger.SchemaVersion)
		}
	})
}

func TestSQLiteFileMode(t *testing.T) {
	db := newSQLite(t)
	// An existing file readable by others is tightened.
	if err := os.WriteFile(db.dsn, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	l := db.open(t)
	record(t, l, rec(1))
	for _, name := range []string{db.dsn, db.dsn + "-wal", db.dsn + "-shm"} {
		st, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", filepath.Base(name), st.Mode().Perm())
		}
	}
}

// TestNewerSchema: a database migrated by a newer meshid-ca is not touched.
func TestNewerSchema(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l, err := ledger.Open(context.Background(), db.config())
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
		now := "0"
		if db.driver == "postgres" {
			now = "now()"
		}
		if _, err := db.raw(t).Exec("INSERT INTO schema_migrations (version, applied_at) VALUES (99, " + now + ")"); err != nil {
			t.Fatal(err)
		}
		l, err = ledger.Open(context.Background(), db.config())
		if err == nil {
			l.Close()
			t.Fatal("Open succeeded on a newer schema")
		}
		if !strings.Contains(err.Error(), "schema version 99 is newer") {
			t.Errorf("Open: %v", err)
		}
	})
}

// TestConcurrentOpen: replicas starting together both open the ledger, and
// each migration runs once.
func TestConcurrentOpen(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		const n = 4
		var wg sync.WaitGroup
		ls := make([]*ledger.Ledger, n)
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() { ls[i], errs[i] = ledger.Open(context.Background(), db.config()) })
		}
		wg.Wait()
		for i := range n {
			if errs[i] != nil {
				t.Errorf("Open %d: %v", i, errs[i])
				continue
			}
			defer ls[i].Close()
			record(t, ls[i], rec(i))
		}
		if got := db.count(t, "schema_migrations"); got != ledger.SchemaVersion {
			t.Errorf("%d rows in schema_migrations, want %d", got, ledger.SchemaVersion)
		}
		if got := db.records(t); got != n {
			t.Errorf("%d certificates, want %d", got, n)
		}
	})
}

func TestOpenRefused(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		cfg ledger.Config
		msg string
	}{
		{ledger.Config{Driver: "mysql", DSN: "x"}, `unknown driver "mysql"`},
		{ledger.Config{Driver: "sqlite"}, "empty"},
		{ledger.Config{Driver: "sqlite", DSN: filepath.Join(dir, "missing", "ledger.db")}, "directory"},
		{ledger.Config{Driver: "sqlite", DSN: "file:" + filepath.Join(dir, "x.db")}, "plain file path"},
		{ledger.Config{Driver: "sqlite", DSN: filepath.Join(dir, "x.db?mode=ro")}, "plain file path"},
		{ledger.Config{Driver: "sqlite", DSN: filepath.Join(dir, "x.db"), MaxBatch: -1}, "negative"},
		{ledger.Config{Driver: "postgres"}, "empty"},
		{ledger.Config{Driver: "postgres", DSN: "postgres://u:s3cret@host:notaport/db"}, "does not parse"},
	} {
		l, err := ledger.Open(context.Background(), tc.cfg)
		if err == nil {
			l.Close()
			t.Errorf("Open(%+v) succeeded", tc.cfg)
			continue
		}
		if !strings.Contains(err.Error(), tc.msg) || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Open(%+v) = %v, want an error saying %q", tc.cfg, err, tc.msg)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x.db")); err == nil {
		t.Error("a refused Open created the database file")
	}
}

func TestPostgresUnavailable(t *testing.T) {
	// Nothing listens on port 1.
	_, err := ledger.Open(context.Background(), ledger.Config{Driver: "postgres", DSN: "postgres://u:p@127.0.0.1:1/db?connect_timeout=2"})
	if !errors.Is(err, ledger.ErrUnavailable) {
		t.Errorf("Open on a closed port = %v, want ErrUnavailable", err)
	}
}

// TestCommitFails: when a commit fails, the records of its batch get an
// error wrapping ErrUnavailable and are not stored; the loop goes on.
func TestCommitFails(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		// A trigger makes any batch holding serial dead fail.
		// (SQLite inserts new records into recent first.)
		trigger := []string{`CREATE TRIGGER fail BEFORE INSERT ON recent
			WHEN NEW.serial = 'dead' BEGIN SELECT RAISE(ABORT, 'boom'); END`}
		if db.driver == "postgres" {
			trigger = []string{
				`CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$
				BEGIN IF NEW.serial = 'dead' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$`,
				`CREATE TRIGGER fail BEFORE INSERT ON certificates FOR EACH ROW EXECUTE FUNCTION fail()`,
			}
		}
		for _, stmt := range trigger {
			if _, err := db.raw(t).Exec(stmt); err != nil {
				t.Fatal(err)
			}
		}
		dead := rec(0, func(r *ledger.Record) { r.Serial = "dead" })
		if err := l.Record(context.Background(), dead); !errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), "boom") {
			t.Errorf("Record(dead) = %v, want ErrUnavailable", err)
		}
		// Concurrent records: those batched with dead fail, the others
		// are stored.
		var wg sync.WaitGroup
		var mu sync.Mutex
		var ok, failed []string
		for i := range 32 {
			wg.Go(func() {
				r := rec(i + 1)
				if i == 16 {
					r = dead
				}
				err := l.Record(context.Background(), r)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					ok = append(ok, r.Serial)
				case errors.Is(err, ledger.ErrUnavailable):
					failed = append(failed, r.Serial)
				default:
					t.Errorf("Record: %v", err)
				}
			})
		}
		wg.Wait()
		if !slices.Contains(failed, "dead") {
			t.Error("dead was stored")
		}
		stored := serials(all(t, l, ledger.Filter{}))
		slices.Sort(stored)
		slices.Sort(ok)
		if !slices.Equal(stored, ok) {
			t.Errorf("stored %v, acknowledged %v", stored, ok)
		}
		t.Logf("%d stored, %d failed with dead", len(ok), len(failed))
		record(t, l, rec(100))
	})
}

// TestDuplicateInBatch: copies of a serial in one batch are stored once; a
// copy that differs is refused alone.
func TestDuplicateInBatch(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		a, b := rec(1), rec(2)
		other := rec(1, func(r *ledger.Record) { r.PodName = "elsewhere" })
		err := ledger.BulkInsert(context.Background(), l, []ledger.Record{a, b, a, other})
		if err == nil || errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), "record "+a.Serial+": the serial is already recorded") {
			t.Errorf("BulkInsert = %v", err)
		}
		if got := serials(all(t, l, ledger.Filter{})); !slices.Equal(got, []string{a.Serial, b.Serial}) {
			t.Errorf("stored %v", got)
		}
		if got, _ := l.Certificate(context.Background(), a.Serial); got != a {
			t.Errorf("stored %+v, want %+v", got, a)
		}
	})
}
