package ledger

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"time"
)

// migrations[v-1] takes the schema from version v-1 to v. Append only: a
// released migration is never edited. {time}, {id} and {serial} are replaced
// by the dialect's types.
var migrations = [][]string{
	{ // 1: the first schema.
		`CREATE TABLE certificates (
			serial             {serial} PRIMARY KEY,
			spiffe_id          TEXT NOT NULL,
			namespace          TEXT NOT NULL,
			service_account    TEXT NOT NULL,
			pod_name           TEXT NOT NULL,
			pod_uid            TEXT NOT NULL,
			cluster_id         TEXT NOT NULL,
			public_key_sha256  TEXT NOT NULL,
			not_before         {time} NOT NULL,
			not_after          {time} NOT NULL,
			issuer_fingerprint TEXT NOT NULL,
			auth_method        TEXT NOT NULL,
			issued_at          {time} NOT NULL
		)`,
		// Each equality filter comes with the page order, so the first page
		// of a filtered query is read straight off its index.
		`CREATE INDEX certificates_by_spiffe_id ON certificates (spiffe_id, issued_at, serial)`,
		`CREATE INDEX certificates_by_namespace ON certificates (namespace, issued_at, serial)`,
		`CREATE INDEX certificates_by_pod_name ON certificates (pod_name, issued_at, serial)`,
		`CREATE INDEX certificates_by_issued_at ON certificates (issued_at, serial)`,
		// Valid and expiring certificates, Identities() and Prune.
		`CREATE INDEX certificates_by_not_after ON certificates (not_after)`,
		// Upserted with the certificates, so listing identities never
		// scans every certificate.
		`CREATE TABLE identities (
			spiffe_id       TEXT PRIMARY KEY,
			namespace       TEXT NOT NULL,
			service_account TEXT NOT NULL,
			first_issued    {time} NOT NULL,
			last_issued     {time} NOT NULL
		)`,
		`CREATE INDEX identities_by_namespace ON identities (namespace, spiffe_id)`,
		`CREATE TABLE denials (
			spiffe_id TEXT PRIMARY KEY,
			reason    TEXT NOT NULL,
			denied_by TEXT NOT NULL,
			denied_at {time} NOT NULL
		)`,
		`CREATE TABLE admin_events (
			id        {id},
			at        {time} NOT NULL,
			actor     TEXT NOT NULL,
			action    TEXT NOT NULL CHECK (action IN ('deny', 'allow')),
			spiffe_id TEXT NOT NULL,
			reason    TEXT NOT NULL
		)`,
		`CREATE INDEX admin_events_by_spiffe_id ON admin_events (spiffe_id, at)`,
	},
	{ // 2: new records land here first (SQLite), unindexed but for the
		// key, and are moved into certificates in large transactions, so
		// the index inserts stay off the commits requests wait on.
		// PostgreSQL keeps it empty: its commits batch by themselves.
		`CREATE TABLE recent (
			serial             {serial} PRIMARY KEY,
			spiffe_id          TEXT NOT NULL,
			namespace          TEXT NOT NULL,
			service_account    TEXT NOT NULL,
			pod_name           TEXT NOT NULL,
			pod_uid            TEXT NOT NULL,
			cluster_id         TEXT NOT NULL,
			public_key_sha256  TEXT NOT NULL,
			not_before         {time} NOT NULL,
			not_after          {time} NOT NULL,
			issuer_fingerprint TEXT NOT NULL,
			auth_method        TEXT NOT NULL,
			issued_at          {time} NOT NULL
		)`,
	},
	{ // 3: who asked, when it is not the identity's holder itself: a node
		// proxy (Istio ambient's ztunnel) asking for a workload on its node.
		`ALTER TABLE certificates ADD COLUMN requested_by TEXT NOT NULL DEFAULT ''`,
		`ALTER TABLE recent ADD COLUMN requested_by TEXT NOT NULL DEFAULT ''`,
	},
}

// schemaVersion is the schema this code writes and reads.
const schemaVersion = 3

func init() {
	if len(migrations) != schemaVersion {
		panic("ledger: schemaVersion does not match migrations")
	}
}

// migrate applies the migrations db lacks, each in its own transaction that
// also records it in schema_migrations.
func migrate(ctx context.Context, d *dialect, db *sql.DB, log *slog.Logger) error {
	return migrateTo(ctx, d, db, log, schemaVersion)
}

// migrateTo applies the migrations up to version target (tests start from
// older schemas with it).
func migrateTo(ctx context.Context, d *dialect, db *sql.DB, log *slog.Logger, target int) error {
	for {
		done, err := migrateOne(ctx, d, db, log, target)
		if err != nil || done {
			return err
		}
	}
}

// migrateOne applies the next migration up to target, if any; done reports
// that the schema is at target.
func migrateOne(ctx context.Context, d *dialect, db *sql.DB, log *slog.Logger, target int) (done bool, err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, unavailable(fmt.Errorf("migrating: %w", err))
	}
	defer tx.Rollback()
	if d.lockMigrations != "" {
		// Held until the transaction ends: a second replica waits here, then
		// finds the version this one recorded.
		if _, err := tx.ExecContext(ctx, d.lockMigrations); err != nil {
			return false, unavailable(fmt.Errorf("migrating: %w", err))
		}
	}
	if _, err := tx.ExecContext(ctx, d.schema(`CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER PRIMARY KEY,
		applied_at {time} NOT NULL
	)`)); err != nil {
		return false, unavailable(fmt.Errorf("migrating: %w", err))
	}
	var current sql.NullInt64
	if err := tx.QueryRowContext(ctx, "SELECT MAX(version) FROM schema_migrations").Scan(&current); err != nil {
		return false, unavailable(fmt.Errorf("migrating: %w", err))
	}
	v := int(current.Int64)
	switch {
	case v > schemaVersion:
		return false, errorf("database schema version %d is newer than this meshid-ca knows (%d): upgrade meshid-ca, or point it at another database", v, schemaVersion)
	case v >= target:
		return true, tx.Commit()
	}
	for _, stmt := range migrations[v] {
		if _, err := tx.ExecContext(ctx, d.schema(stmt)); err != nil {
			return false, unavailable(fmt.Errorf("migration %d: %w", v+1, err))
		}
	}
	if _, err := tx.ExecContext(ctx, d.rebind("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"), v+1, d.timeArg(time.Now())); err != nil {
		return false, unavailable(fmt.Errorf("migration %d: %w", v+1, err))
	}
	if err := tx.Commit(); err != nil {
		return false, unavailable(fmt.Errorf("migration %d: %w", v+1, err))
	}
	log.Info("ledger: schema migrated", "driver", d.name, "version", v+1)
	return false, nil
}
