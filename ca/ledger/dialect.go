package ledger

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"modernc.org/sqlite" // database/sql driver "sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// dialect is everything that differs between SQLite and PostgreSQL. The rest
// of the package writes SQL once, with ? placeholders.
type dialect struct {
	name string
	// numbered placeholders: $1, $2, … instead of ?.
	numbered bool
	// Column types substituted into the schema for {time}, {id} and
	// {serial} (compared byte by byte, as Go compares strings, whatever the
	// database's collation).
	timeType, idType, serialType string
	// Two-argument scalar min and max.
	least, greatest string
	// lockMigrations runs first in every migration transaction so that
	// replicas opening one database at once apply each migration once.
	lockMigrations string
}

// migrationLockKey is the advisory lock meshid-ca's migrations take in
// PostgreSQL: "meshid" in ASCII, then 1.
const migrationLockKey = 0x6d6573686964_0001

var (
	// SQLite stores times as integer Unix microseconds: exact, compact, and
	// they sort as times.
	sqliteDialect = &dialect{
		name:       "sqlite",
		timeType:   "INTEGER",
		idType:     "INTEGER PRIMARY KEY AUTOINCREMENT", // ids of audit rows are never reused
		serialType: "TEXT",
		least:      "min",
		greatest:   "max",
	}
	postgresDialect = &dialect{
		name:           "postgres",
		numbered:       true,
		timeType:       "TIMESTAMPTZ",
		idType:         "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
		serialType:     `TEXT COLLATE "C"`,
		least:          "LEAST",
		greatest:       "GREATEST",
		lockMigrations: "SELECT pg_advisory_xact_lock(" + strconv.FormatInt(migrationLockKey, 10) + ")",
	}
)

// rebind turns the ? placeholders of query into the dialect's. Queries in
// this package never hold a ? inside a literal.
func (d *dialect) rebind(query string) string {
	if !d.numbered {
		return query
	}
	var b strings.Builder
	b.Grow(len(query) + len(query)/8)
	n := 0
	for i := 0; i < len(query); i++ {
		if query[i] != '?' {
			b.WriteByte(query[i])
			continue
		}
		n++
		b.WriteByte('$')
		b.WriteString(strconv.Itoa(n))
	}
	return b.String()
}

// schema substitutes the dialect's types into a statement of a migration.
func (d *dialect) schema(stmt string) string {
	return strings.NewReplacer("{time}", d.timeType, "{id}", d.idType, "{serial}", d.serialType).Replace(stmt)
}

// timeArg is t as the database stores it: UTC, microseconds.
func (d *dialect) timeArg(t time.Time) any {
	t = t.UTC().Truncate(time.Microsecond)
	if d == sqliteDialect {
		return t.UnixMicro()
	}
	return t
}

// timeCol scans a time column of either dialect into t, in UTC; NULL is the
// zero time.
type timeCol struct{ t *time.Time }

func (c timeCol) Scan(v any) error {
	switch v := v.(type) {
	case nil:
		*c.t = time.Time{}
	case int64:
		*c.t = time.UnixMicro(v).UTC()
	case time.Time:
		*c.t = v.UTC()
	default:
		return fmt.Errorf("ledger: time column holds %T", v)
	}
	return nil
}

// sqliteReaders bounds the read connections to a SQLite ledger; WAL lets
// them read while the writer commits.
const sqliteReaders = 4

// openSQLite opens path with one writer connection and a pool of read-only
// ones. The file is created mode 0600; SQLite gives its -wal and -shm files
// the same mode.
func openSQLite(ctx context.Context, path string, log *slog.Logger) (w, r *sql.DB, err error) {
	switch {
	case path == "":
		return nil, nil, errorf("sqlite: DSN (the database file) is empty")
	case strings.HasPrefix(path, "file:") || strings.ContainsAny(path, "?#") || path == ":memory:":
		return nil, nil, errorf("sqlite: DSN must be a plain file path, not %q", path)
	}
	dir := filepath.Dir(path)
	if st, err := os.Stat(dir); err != nil {
		return nil, nil, errorf("sqlite: directory of the database: %w", err)
	} else if !st.IsDir() {
		return nil, nil, errorf("sqlite: %s is not a directory", dir)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, errorf("sqlite: %w", err)
	}
	st, err := f.Stat()
	f.Close()
	if err != nil {
		return nil, nil, errorf("sqlite: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		log.Warn("ledger: database file was readable by others; made it 0600", "path", path, "mode", st.Mode().Perm().String())
		if err := os.Chmod(path, 0o600); err != nil {
			return nil, nil, errorf("sqlite: %w", err)
		}
	}
	for _, suffix := range []string{"-wal", "-shm"} {
		if err := os.Chmod(path+suffix, 0o600); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, nil, errorf("sqlite: %w", err)
		}
	}

	// BEGIN IMMEDIATE: a write transaction takes the lock at once instead of
	// failing with SQLITE_BUSY when it first writes.
	// analysis_limit keeps PRAGMA optimize (at Open and Close) quick on a
	// large ledger.
	const common = "_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)&_pragma=temp_store(MEMORY)"
	w, err = sql.Open("sqlite", path+"?"+common+"&_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=analysis_limit(1000)&_txlock=immediate")
	if err != nil {
		return nil, nil, errorf("sqlite: %w", err)
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxIdleTime(0)
	// The writer sets WAL mode in the file before any reader connects.
	if err := pingSQLite(ctx, w); err != nil {
		w.Close()
		return nil, nil, unavailable(fmt.Errorf("sqlite: %w", err))
	}
	r, err = sql.Open("sqlite", path+"?"+common+"&_pragma=query_only(1)")
	if err != nil {
		w.Close()
		return nil, nil, errorf("sqlite: %w", err)
	}
	r.SetMaxOpenConns(sqliteReaders)
	r.SetMaxIdleConns(sqliteReaders)
	return w, r, nil
}

// pingSQLite opens w's connection, whose pragmas switch a new file to WAL
// mode. Two processes opening one new file at once can meet in that switch,
// where SQLite answers SQLITE_BUSY at once instead of waiting
// (busy_timeout does not apply to it): retry for as long as busy_timeout.
func pingSQLite(ctx context.Context, w *sql.DB) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := w.PingContext(ctx)
		var se *sqlite.Error
		if err == nil || !errors.As(err, &se) || se.Code()&0xff != sqlite3.SQLITE_BUSY || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// openPostgres opens a pool. The password that a DSN may hold is never put
// into an error.
func openPostgres(ctx context.Context, dsn string, log *slog.Logger) (*sql.DB, error) {
	if dsn == "" {
		return nil, errorf("postgres: DSN is empty")
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, errorf("postgres: DSN does not parse (not shown: it may hold a password)")
	}
	db := postgresPool(cfg)
	// A recorded certificate must survive a crash of the server. Any
	// setting but off waits at least for the local WAL flush; a stronger
	// one (remote_apply, for synchronous standbys) is kept.
	var sync string
	if err := db.QueryRowContext(ctx, "SHOW synchronous_commit").Scan(&sync); err != nil {
		db.Close()
		return nil, unavailable(fmt.Errorf("postgres: %w", err))
	}
	if sync == "off" {
		log.Warn("ledger: the server has synchronous_commit=off; the ledger's sessions turn it on")
		db.Close()
		if cfg.RuntimeParams == nil {
			cfg.RuntimeParams = map[string]string{}
		}
		cfg.RuntimeParams["synchronous_commit"] = "on"
		db = postgresPool(cfg)
	}
	return db, nil
}

func postgresPool(cfg *pgx.ConnConfig) *sql.DB {
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(16)
	db.SetMaxIdleConns(8)
	db.SetConnMaxIdleTime(5 * time.Minute)
	return db
}
