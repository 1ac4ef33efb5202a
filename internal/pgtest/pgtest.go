// Package pgtest gives tests a PostgreSQL database of their own on the
// server hack/postgres.sh starts, dropped when the test ends.
package pgtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
)

// DSNEnv names the variable holding a DSN of a role allowed to create
// databases (hack/postgres.sh prints one).
const DSNEnv = "MESHID_TEST_POSTGRES_DSN"

// RequireEnv, set to 1, makes a missing server a failure instead of a skip
// (hack/test.sh sets it: CI must never skip these tests).
const RequireEnv = "MESHID_REQUIRE_POSTGRES"

// Database creates an empty database and returns its DSN. Without a server
// the test is skipped, or fails under RequireEnv.
func Database(t testing.TB) string {
	t.Helper()
	base := os.Getenv(DSNEnv)
	if base == "" {
		msg := "no PostgreSQL: set " + DSNEnv + "=$(hack/postgres.sh)"
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	u, err := url.Parse(base)
	if err != nil {
		t.Fatalf("%s: %v", DSNEnv, err)
	}
	admin, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	b := make([]byte, 6)
	rand.Read(b)
	name := "meshid_test_" + hex.EncodeToString(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("creating a test database on %s (is hack/postgres.sh's server up?): %v", u.Redacted(), err)
	}
	t.Cleanup(func() {
		db, err := sql.Open("pgx", base)
		if err != nil {
			return
		}
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// FORCE ends sessions left open, but needs rights over autovacuum
		// workers a busy database may have: try without it first.
		if _, err := db.ExecContext(ctx, "DROP DATABASE IF EXISTS "+name); err == nil {
			return
		}
		if _, err := db.ExecContext(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Logf("dropping test database %s: %v", name, err)
		}
	})
	u.Path = "/" + name
	return u.String()
}
