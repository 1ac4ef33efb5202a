package ledger

import (
	"context"
	"path/filepath"
	"testing"
)

// TestSQLitePragmas checks the settings durability depends on, on the
// connections that use them.
func TestSQLitePragmas(t *testing.T) {
	l, err := Open(context.Background(), Config{Driver: "sqlite", DSN: filepath.Join(t.TempDir(), "ledger.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, tc := range []struct {
		name   string
		db     string
		pragma string
		want   string
	}{
		{"writer", "w", "journal_mode", "wal"},
		{"writer", "w", "synchronous", "2"}, // FULL
		{"writer", "w", "foreign_keys", "1"},
		{"writer", "w", "busy_timeout", "10000"},
		{"reader", "r", "journal_mode", "wal"},
		{"reader", "r", "query_only", "1"},
		{"reader", "r", "busy_timeout", "10000"},
	} {
		db := l.w
		if tc.db == "r" {
			db = l.r
		}
		var got string
		if err := db.QueryRow("PRAGMA " + tc.pragma).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("%s: PRAGMA %s = %s, want %s", tc.name, tc.pragma, got, tc.want)
		}
	}
}
