package ledger_test

import (
	"context"
	"database/sql"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/ledger"
)

// newBenchDB is a fresh database for driver.
func newBenchDB(b *testing.B, driver string) testDB {
	if driver == "sqlite" {
		return newSQLite(b)
	}
	return newPostgres(b)
}

// BenchmarkRecord measures Record throughput under a renewal storm: 32
// callers per core, each waiting for its record to be durable.
func BenchmarkRecord(b *testing.B) {
	for _, driver := range []string{"sqlite", "postgres"} {
		b.Run(driver, func(b *testing.B) {
			db := newBenchDB(b, driver)
			l := db.open(b)
			var n atomic.Int64
			b.SetParallelism(32)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := int(n.Add(1))
					r := rec(i, identity(fmt.Sprintf("ns-%d", i%50), fmt.Sprintf("sa-%d", i%5000)))
					if err := l.Record(context.Background(), r); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			st := l.Stats()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
			b.ReportMetric(float64(st.Records)/float64(max(st.Commits, 1)), "records/commit")
		})
	}
}

// The 1M-record ledger: 5,000 identities in 50 namespaces, 10 pods each,
// issued at random over the 30 days before benchEnd, for 1h to 24h.
const (
	benchRecords    = 1_000_000
	benchIdentities = 5000
	benchNamespaces = 50
	benchPods       = 10
	// benchGeneration changes when the generator does, so that a cached
	// database is rebuilt.
	benchGeneration = 1
)

var benchEnd = time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)

func benchIdentity(k int) (id, ns, sa string) {
	ns = fmt.Sprintf("ns-%02d", k%benchNamespaces)
	sa = fmt.Sprintf("sa-%04d", k)
	return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa, ns, sa
}

func benchPod(k, p int) string { return fmt.Sprintf("sa-%04d-%d", k, p) }

// populate bulk-loads the 1M records, 50,000 per transaction.
func populate(b *testing.B, l *ledger.Ledger) {
	rng := rand.New(rand.NewPCG(1, benchGeneration))
	start := benchEnd.Add(-30 * 24 * time.Hour)
	hexOf := func(n int) string {
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		return hex.EncodeToString(buf)
	}
	const chunk = 50_000
	t := time.Now()
	for done := 0; done < benchRecords; done += chunk {
		rs := make([]ledger.Record, chunk)
		for i := range rs {
			k := (done + i) % benchIdentities
			id, ns, sa := benchIdentity(k)
			p := rng.IntN(benchPods)
			issued := start.Add(time.Duration(rng.Int64N(int64(30 * 24 * time.Hour)))).Truncate(time.Microsecond)
			life := time.Hour + time.Duration(rng.Int64N(int64(23*time.Hour)))
			rs[i] = ledger.Record{
				Serial:            strings.TrimLeft(hexOf(16), "0"),
				SPIFFEID:          id,
				Namespace:         ns,
				ServiceAccount:    sa,
				PodName:           benchPod(k, p),
				PodUID:            fmt.Sprintf("uid-%04d-%d", k, p),
				ClusterID:         "Kubernetes",
				PublicKeySHA256:   hexOf(32),
				NotBefore:         issued.Add(-time.Minute),
				NotAfter:          issued.Add(life),
				IssuerFingerprint: strings.Repeat("cd", 32),
				AuthMethod:        "tokenreview",
				IssuedAt:          issued,
			}
		}
		if err := ledger.BulkInsert(context.Background(), l, rs); err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("populated %d records in %v", benchRecords, time.Since(t).Round(time.Second))
}

// analyze refreshes the query planner's statistics, as PRAGMA optimize
// (SQLite, at Open and Close) and autovacuum (PostgreSQL) do in service.
func analyze(b *testing.B, db testDB) {
	if _, err := db.raw(b).Exec("ANALYZE"); err != nil {
		b.Fatal(err)
	}
}

// ledger1M opens a ledger holding the 1M records. The SQLite file is
// cached under os.TempDir, keyed by schema and generator versions; the
// PostgreSQL database is built for each run and dropped.
func ledger1M(b *testing.B, driver string) *ledger.Ledger {
	if driver == "postgres" {
		db := newPostgres(b)
		l := db.open(b)
		populate(b, l)
		analyze(b, db)
		return l
	}
	path := filepath.Join(os.TempDir(), fmt.Sprintf("meshid-ledger-bench-s%d-g%d.db", ledger.SchemaVersion, benchGeneration))
	if _, err := os.Stat(path); err != nil {
		tmp := path + ".tmp"
		for _, suffix := range []string{"", "-wal", "-shm"} {
			os.Remove(tmp + suffix)
		}
		db := testDB{driver: "sqlite", dsn: tmp}
		l, err := ledger.Open(context.Background(), db.config())
		if err != nil {
			b.Fatal(err)
		}
		populate(b, l)
		if err := l.Close(); err != nil {
			b.Fatal(err)
		}
		raw, err := sql.Open("sqlite", tmp)
		if err != nil {
			b.Fatal(err)
		}
		_, err = raw.Exec("ANALYZE")
		raw.Close()
		if err != nil {
			b.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			b.Fatal(err)
		}
	} else {
		b.Logf("using the cached %s", path)
	}
	return testDB{driver: "sqlite", dsn: path}.open(b)
}

// BenchmarkQuery1M measures the first page (100) of each kind of filtered
// query on 1,000,000 records.
func BenchmarkQuery1M(b *testing.B) {
	for _, driver := range []string{"sqlite", "postgres"} {
		b.Run(driver, func(b *testing.B) {
			l := ledger1M(b, driver)
			newest, err := l.Certificates(context.Background(), ledger.Filter{Limit: 1000})
			if err != nil {
				b.Fatal(err)
			}
			// The second page of each namespace's valid certificates.
			var page2 []ledger.Filter
			for n := range benchNamespaces {
				f := ledger.Filter{Namespace: fmt.Sprintf("ns-%02d", n), ValidOnly: true, Now: benchEnd}
				p, err := l.Certificates(context.Background(), f)
				if err != nil || p.Next == "" {
					b.Fatalf("first page: %v", err)
				}
				f.PageToken = p.Next
				page2 = append(page2, f)
			}
			for _, q := range []struct {
				name   string
				filter func(i int) ledger.Filter
			}{
				{"spiffe_id", func(i int) ledger.Filter {
					id, _, _ := benchIdentity(i * 7919 % benchIdentities)
					return ledger.Filter{SPIFFEID: id}
				}},
				{"namespace", func(i int) ledger.Filter {
					return ledger.Filter{Namespace: fmt.Sprintf("ns-%02d", i%benchNamespaces)}
				}},
				{"pod", func(i int) ledger.Filter {
					return ledger.Filter{PodName: benchPod(i*7919%benchIdentities, i%benchPods)}
				}},
				{"serial", func(i int) ledger.Filter {
					return ledger.Filter{Serial: newest.Records[i%len(newest.Records)].Serial}
				}},
				{"issued_since_1h", func(i int) ledger.Filter {
					return ledger.Filter{IssuedSince: benchEnd.Add(-time.Hour)}
				}},
				{"expiring_within_1h", func(i int) ledger.Filter {
					return ledger.Filter{ExpiringWithin: time.Hour, Now: benchEnd}
				}},
				{"namespace_valid_page2", func(i int) ledger.Filter {
					return page2[i%benchNamespaces]
				}},
			} {
				b.Run(q.name, func(b *testing.B) {
					rows := 0
					for i := 0; b.Loop(); i++ {
						p, err := l.Certificates(context.Background(), q.filter(i))
						if err != nil {
							b.Fatal(err)
						}
						rows += len(p.Records)
					}
					b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
					b.ReportMetric(float64(rows)/float64(b.N), "rows/op")
				})
			}
			b.Run("identities_namespace", func(b *testing.B) {
				for i := 0; b.Loop(); i++ {
					ids, err := l.Identities(context.Background(), fmt.Sprintf("ns-%02d", i%benchNamespaces), benchEnd)
					if err != nil || len(ids) != benchIdentities/benchNamespaces {
						b.Fatalf("Identities = %d, %v", len(ids), err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
			})
			b.Run("identities_all", func(b *testing.B) {
				for b.Loop() {
					if _, err := l.Identities(context.Background(), "", benchEnd); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
			})
		})
	}
}
