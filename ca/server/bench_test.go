package server

import (
	"context"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/internal/pgtest"
)

// recordNothing is the baseline of BenchmarkIssuanceLedger: the same server
// with no ledger write. Never used outside benchmarks (docs/design.md, rule 6).
type recordNothing struct{}

func (recordNothing) Record(context.Context, ledger.Record) error { return nil }

// BenchmarkIssuanceLedger measures CreateCertificate over gRPC + TLS on
// loopback, 64 requests in flight from 64 identities, with the ledger on
// SQLite and on PostgreSQL, and the same server recording nothing, in one
// run. Reported: certificates per second and, for the ledgers, the ratio to
// the baseline measured just before. Run with -benchtime=5s or more and
// -count=3; PostgreSQL needs MESHID_TEST_POSTGRES_DSN (hack/postgres.sh).
func BenchmarkIssuanceLedger(b *testing.B) {
	var baseline float64
	for _, kind := range []string{"none", "sqlite", "postgres"} {
		b.Run("ledger="+kind, func(b *testing.B) {
			var rec Recorder
			switch kind {
			case "none":
				rec = recordNothing{}
			case "sqlite", "postgres":
				cfg := ledger.Config{Driver: kind, DSN: filepath.Join(b.TempDir(), "ledger.db"), CommitDelay: benchCommitDelay(b)}
				if kind == "postgres" {
					cfg.DSN = pgtest.Database(b)
				}
				l, err := ledger.Open(context.Background(), cfg)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { l.Close() })
				rec = l
			}
			e := newEnv(b, envOptions{ledger: rec})
			const identities = 64
			inFlight := benchInFlight()
			type caller struct{ token, csr string }
			callers := make([]caller, identities)
			for i := range callers {
				sa := fmt.Sprintf("w%d", i)
				id := spiffeid.RequireFromPath(td, "/ns/bench/sa/"+sa)
				callers[i] = caller{e.token(b, "bench", sa), csrForID(b, id)}
			}
			// Requests spread over several connections, as many pods'
			// agents spread them: one connection's HTTP/2 reader would
			// otherwise be the bottleneck.
			clients := make([]pb.IstioCertificateServiceClient, benchConns())
			for i := range clients {
				conn, err := agent.DialCA(e.addr, func() []*x509.Certificate { return []*x509.Certificate{e.material.RootCert} }, "istiod.istio-system.svc")
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { conn.Close() })
				clients[i] = pb.NewIstioCertificateServiceClient(conn)
			}
			var next atomic.Int64
			b.SetParallelism(inFlight / runtime.GOMAXPROCS(0))
			b.ResetTimer()
			start, cpu0 := time.Now(), processCPU()
			b.RunParallel(func(p *testing.PB) {
				i := next.Add(1)
				c, client := callers[i%identities], clients[i%int64(len(clients))]
				ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+c.token)
				for p.Next() {
					if _, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: c.csr, ValidityDuration: 3600}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			rate := float64(b.N) / time.Since(start).Seconds()
			cpu := processCPU() - cpu0
			b.StopTimer()
			b.ReportMetric(rate, "certs/s")
			// Server and load generator together, as in one process.
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/cert")
			if l, ok := rec.(*ledger.Ledger); ok {
				st := l.Stats()
				b.ReportMetric(float64(st.Records)/float64(max(st.Commits, 1)), "records/commit")
			}
			if kind == "none" {
				baseline = rate
			} else if baseline > 0 {
				b.ReportMetric(rate/baseline, "ratio-to-none")
			}
		})
	}
}

// csrForID is a P-256 CSR naming id.
func csrForID(t testing.TB, id spiffeid.ID) string {
	return csrFor(t, testKey(), func(r *x509.CertificateRequest) { r.URIs = []*url.URL{id.URL()} })
}

// processCPU is the user and system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchCommitDelay is the ledgers' CommitDelay: MESHID_BENCH_COMMIT_DELAY
// (a Go duration, negative for none), default the ledger's own.
func benchCommitDelay(b *testing.B) time.Duration {
	v := os.Getenv("MESHID_BENCH_COMMIT_DELAY")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		b.Fatalf("MESHID_BENCH_COMMIT_DELAY: %v", err)
	}
	return d
}

// benchConns is how many connections BenchmarkIssuanceLedger spreads its
// requests over: MESHID_BENCH_CONNS, default 8.
func benchConns() int {
	if n, err := strconv.Atoi(os.Getenv("MESHID_BENCH_CONNS")); err == nil && n > 0 {
		return n
	}
	return 8
}

// benchInFlight is how many requests BenchmarkIssuanceLedger keeps in
// flight: MESHID_BENCH_IN_FLIGHT, default 64.
func benchInFlight() int {
	if n, err := strconv.Atoi(os.Getenv("MESHID_BENCH_IN_FLIGHT")); err == nil && n > 0 {
		return n
	}
	return 64
}
