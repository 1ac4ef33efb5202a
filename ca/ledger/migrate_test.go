package ledger_test

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/ledger"
)

// TestMigrationsCarryRecordsForward: a ledger an older meshid-ca left (a
// record written under schema 1, another under schema 2 still in the table
// new records land in) opens under the current schema with both records
// intact, and records the new fields from then on.
func TestMigrationsCarryRecordsForward(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		raw := db.raw(t)
		timeArg := func(tm time.Time) any {
			if db.driver == "sqlite" {
				return tm.UnixMicro()
			}
			return tm
		}
		insert := func(table string, r ledger.Record) {
			t.Helper()
			q := "INSERT INTO " + table + " (serial, spiffe_id, namespace, service_account, pod_name, pod_uid, cluster_id, public_key_sha256, not_before, not_after, issuer_fingerprint, auth_method, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
			if db.driver == "postgres" {
				q = "INSERT INTO " + table + " (serial, spiffe_id, namespace, service_account, pod_name, pod_uid, cluster_id, public_key_sha256, not_before, not_after, issuer_fingerprint, auth_method, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
			}
			if _, err := raw.ExecContext(ctx, q, r.Serial, r.SPIFFEID, r.Namespace, r.ServiceAccount, r.PodName, r.PodUID, r.ClusterID,
				r.PublicKeySHA256, timeArg(r.NotBefore), timeArg(r.NotAfter), r.IssuerFingerprint, r.AuthMethod, timeArg(r.IssuedAt)); err != nil {
				t.Fatalf("writing a record as schema %s: %v", table, err)
			}
		}
		if err := ledger.MigrateTo(ctx, db.driver, raw, 1); err != nil {
			t.Fatal(err)
		}
		v1, v2 := rec(1), rec(2)
		insert("certificates", v1)
		if err := ledger.MigrateTo(ctx, db.driver, raw, 2); err != nil {
			t.Fatal(err)
		}
		// Schema 2 put SQLite's new records in recent first; PostgreSQL's
		// stayed in certificates.
		if db.driver == "sqlite" {
			insert("recent", v2)
		} else {
			insert("certificates", v2)
		}

		l, err := ledger.Open(ctx, db.config())
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if n := db.count(t, "schema_migrations"); n != ledger.SchemaVersion {
			t.Errorf("%d rows in schema_migrations, want %d", n, ledger.SchemaVersion)
		}
		for _, want := range []ledger.Record{v1, v2} {
			got, err := l.Certificate(ctx, want.Serial)
			if err != nil {
				t.Fatalf("record %s written under an older schema: %v", want.Serial, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("record %s after migrating:\n got %+v\nwant %+v", want.Serial, got, want)
			}
		}
		v3 := rec(3, func(r *ledger.Record) { r.RequestedBy = "spiffe://cluster.local/ns/istio-system/sa/ztunnel" })
		record(t, l, v3)
		got, err := l.Certificate(ctx, v3.Serial)
		if err != nil || !reflect.DeepEqual(got, v3) {
			t.Errorf("record with RequestedBy: %+v, %v; want %+v", got, err, v3)
		}
	})
}
