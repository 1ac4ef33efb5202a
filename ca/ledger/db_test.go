package ledger_test

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"

	"github.com/meshid/meshid/ca/ledger"
)

// The tests run against real databases: SQLite in a temporary directory, and
// PostgreSQL from MESHID_TEST_POSTGRES_DSN, where each test gets a database
// of its own.

const postgresHint = "PostgreSQL tests need MESHID_TEST_POSTGRES_DSN (a role that may CREATE DATABASE): " +
	"MESHID_TEST_POSTGRES_DSN=$(hack/postgres.sh) go test ./ca/ledger"

// testDB is one fresh, empty database.
type testDB struct {
	driver string // "sqlite" or "postgres"
	dsn    string
}

func (db testDB) config() ledger.Config {
	return ledger.Config{Driver: db.driver, DSN: db.dsn, Log: testLogger()}
}

// open opens a ledger on db, closed when the test ends.
func (db testDB) open(tb testing.TB) *ledger.Ledger {
	tb.Helper()
	return db.openWith(tb, db.config())
}

func (db testDB) openWith(tb testing.TB, cfg ledger.Config) *ledger.Ledger {
	tb.Helper()
	l, err := ledger.Open(context.Background(), cfg)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// raw connects to db directly, for looking behind the ledger's back.
func (db testDB) raw(tb testing.TB) *sql.DB {
	tb.Helper()
	driver := "sqlite"
	if db.driver == "postgres" {
		driver = "pgx"
	}
	c, err := sql.Open(driver, db.dsn)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// count returns SELECT COUNT(*) FROM table.
func (db testDB) count(tb testing.TB, table string) int {
	tb.Helper()
	var n int
	if err := db.raw(tb).QueryRow("SELECT COUNT(*) FROM " + table).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}

// records counts certificate records wherever they are (the indexed table
// and the one new records land in), in one statement so that a move
// between the two is seen whole.
func (db testDB) records(tb testing.TB) int {
	tb.Helper()
	var n int
	if err := db.raw(tb).QueryRow("SELECT (SELECT COUNT(*) FROM certificates) + (SELECT COUNT(*) FROM recent)").Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}

// eachDB runs fn as the subtests sqlite and postgres, each on a fresh
// database.
func eachDB(t *testing.T, fn func(t *testing.T, db testDB)) {
	t.Run("sqlite", func(t *testing.T) { fn(t, newSQLite(t)) })
	t.Run("postgres", func(t *testing.T) { fn(t, newPostgres(t)) })
}

func newSQLite(tb testing.TB) testDB {
	return testDB{driver: "sqlite", dsn: filepath.Join(tb.TempDir(), "ledger.db")}
}

// postgresDSN is the DSN of the test server; without one the test is
// skipped, or fails when MESHID_REQUIRE_POSTGRES=1.
func postgresDSN(tb testing.TB) string {
	tb.Helper()
	dsn := os.Getenv("MESHID_TEST_POSTGRES_DSN")
	if dsn == "" {
		if os.Getenv("MESHID_REQUIRE_POSTGRES") == "1" {
			tb.Fatal(postgresHint)
		}
		tb.Skip(postgresHint)
	}
	return dsn
}

// newPostgres creates a database with a random name, dropped when the test
// ends.
func newPostgres(tb testing.TB) testDB {
	tb.Helper()
	admin := postgresDSN(tb)
	name := "meshid_ledger_test_" + randomHex(6)
	createDatabase(tb, admin, name)
	tb.Cleanup(func() { dropDatabase(tb, admin, name) })
	return testDB{driver: "postgres", dsn: withDatabase(admin, name)}
}

func createDatabase(tb testing.TB, admin, name string) {
	tb.Helper()
	c, err := sql.Open("pgx", admin)
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Exec("CREATE DATABASE " + name); err != nil {
		tb.Fatalf("creating test database: %v", err)
	}
}

func dropDatabase(tb testing.TB, admin, name string) {
	tb.Helper()
	c, err := sql.Open("pgx", admin)
	if err != nil {
		tb.Error(err)
		return
	}
	defer c.Close()
	// Plain DROP DATABASE stops autovacuum workers itself (and waits for
	// them); WITH (FORCE) would need the right to signal them. FORCE is for
	// connections a failed test left open.
	if _, err := c.Exec("DROP DATABASE IF EXISTS " + name); err == nil {
		return
	}
	if _, err := c.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)"); err != nil {
		tb.Errorf("dropping test database %s: %v", name, err)
	}
}

// withDatabase points a URL or key=value DSN at database name.
func withDatabase(dsn, name string) string {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			panic(err)
		}
		u.Path = "/" + name
		return u.String()
	}
	return dsn + " dbname=" + name // the last one wins
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// testLogger writes to the test log only with -v.
func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	return slog.New(slog.DiscardHandler)
}

// t0 is the tests' "now": a time with nanoseconds, which the ledger cuts to
// microseconds.
var t0 = time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.UTC)

// us cuts t to what the ledger stores.
func us(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

// rec is a valid record numbered i, issued at t0 - i minutes for one hour,
// changed by mods.
func rec(i int, mods ...func(*ledger.Record)) ledger.Record {
	issued := us(t0).Add(-time.Duration(i) * time.Minute)
	r := ledger.Record{
		Serial:            fmt.Sprintf("%x", 0x10000+i),
		SPIFFEID:          "spiffe://cluster.local/ns/demo/sa/web",
		Namespace:         "demo",
		ServiceAccount:    "web",
		PodName:           fmt.Sprintf("web-%d", i%3),
		PodUID:            fmt.Sprintf("uid-%d", i%3),
		ClusterID:         "Kubernetes",
		PublicKeySHA256:   strings.Repeat("ab", 32),
		NotBefore:         issued.Add(-time.Minute),
		NotAfter:          issued.Add(time.Hour),
		IssuerFingerprint: strings.Repeat("cd", 32),
		AuthMethod:        "tokenreview",
		IssuedAt:          issued,
	}
	for _, m := range mods {
		m(&r)
	}
	return r
}

// identity makes a record's SPIFFE ID, namespace and service account agree.
func identity(ns, sa string) func(*ledger.Record) {
	return func(r *ledger.Record) {
		r.SPIFFEID = "spiffe://cluster.local/ns/" + ns + "/sa/" + sa
		r.Namespace, r.ServiceAccount = ns, sa
	}
}

func record(tb testing.TB, l *ledger.Ledger, rs ...ledger.Record) {
	tb.Helper()
	for _, r := range rs {
		if err := l.Record(context.Background(), r); err != nil {
			tb.Fatalf("Record(%s): %v", r.Serial, err)
		}
	}
}

// all pages through f and returns every record.
func all(tb testing.TB, l *ledger.Ledger, f ledger.Filter) []ledger.Record {
	tb.Helper()
	var out []ledger.Record
	for {
		p, err := l.Certificates(context.Background(), f)
		if err != nil {
			tb.Fatalf("Certificates(%+v): %v", f, err)
		}
		out = append(out, p.Records...)
		if p.Next == "" {
			return out
		}
		f.PageToken = p.Next
	}
}

func serials(rs []ledger.Record) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Serial
	}
	return out
}
