package server

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

type logLine struct {
	Msg        string `json:"msg"`
	Level      string `json:"level"`
	Reason     string `json:"reason"`
	Suppressed uint64 `json:"suppressed"`
}

func parseLines(t *testing.T, out string) []logLine {
	t.Helper()
	var lines []logLine
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		var ll logLine
		if err := json.Unmarshal([]byte(l), &ll); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		lines = append(lines, ll)
	}
	return lines
}

// TestRefusalLogBounded: 20,000 refusals of two reasons over 10 seconds
// write a bounded number of lines, and every refusal is either a line or
// counted in one (suppressed=N), and in the metrics.
func TestRefusalLogBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf lockedBuffer
		log := slog.New(slog.NewJSONHandler(&buf, nil))
		m := NewMetrics(prometheus.NewRegistry(), fixedIssuer{})
		r := newRefusalLog(log, m, time.Now)
		const perReason = 10000
		for i := range perReason {
			r.refuse(log, slog.LevelWarn, "expired", "authentication failed", "i", i)
			r.refuse(log, slog.LevelError, "not_recorded", "certificate not recorded; not returned")
			time.Sleep(time.Millisecond) // 10,000 in 10 s per reason
		}
		time.Sleep(2 * refusalLogEvery) // the flood is over: the summary comes
		synctest.Wait()

		lines := parseLines(t, buf.String())
		accounted := map[string]uint64{}
		count := map[string]int{}
		for _, l := range lines {
			count[l.Reason]++
			accounted[l.Reason] += l.Suppressed
			if !strings.HasPrefix(l.Msg, "refusals not logged") {
				accounted[l.Reason]++
			}
			if l.Reason == "not_recorded" && !strings.HasPrefix(l.Msg, "refusals not logged") && l.Level != "ERROR" {
				t.Errorf("not_recorded logged at %s, want ERROR", l.Level)
			}
		}
		for _, reason := range []string{"expired", "not_recorded"} {
			// 10 at once, then about 1 a second and a summary a second.
			if n := count[reason]; n < refusalLogBurst || n > refusalLogBurst+2*12 {
				t.Errorf("%s: %d lines for %d refusals in 10s, want between %d and %d", reason, n, perReason, refusalLogBurst, refusalLogBurst+24)
			}
			if accounted[reason] != perReason {
				t.Errorf("%s: lines account for %d refusals, want %d", reason, accounted[reason], perReason)
			}
			if got := testutil.ToFloat64(m.refusals.WithLabelValues(reason)); got != perReason {
				t.Errorf("meshid_ca_refusals_total{reason=%q} = %v, want %d", reason, got, perReason)
			}
			logged := uint64(0)
			for _, l := range lines {
				if l.Reason == reason && !strings.HasPrefix(l.Msg, "refusals not logged") {
					logged++
				}
			}
			if got := testutil.ToFloat64(m.refusalLogsSuppressed.WithLabelValues(reason)); uint64(got) != perReason-logged {
				t.Errorf("meshid_ca_refusal_logs_suppressed_total{reason=%q} = %v, want %d", reason, got, perReason-logged)
			}
		}

		// Quiet again: the burst is back, each refusal is a line.
		buf.mu.Lock()
		buf.b.Reset()
		buf.mu.Unlock()
		time.Sleep(refusalLogBurst * refusalLogEvery)
		for range 3 {
			r.refuse(log, slog.LevelWarn, "expired", "authentication failed")
		}
		if got := len(parseLines(t, buf.String())); got != 3 {
			t.Errorf("after a quiet spell, 3 refusals wrote %d lines, want 3", got)
		}
	})
}

// TestJunkTokenFloodLogsBounded: a flood of junk tokens through the real
// gRPC server is refused with Unauthenticated every time, counted per
// reason, and logged at a bounded rate.
func TestJunkTokenFloodLogsBounded(t *testing.T) {
	e := newEnv(t, envOptions{})
	const workers, each = 8, 250
	begin := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				_, err := e.call("junk-"+string(rune('a'+w))+strings.Repeat("x", i%7), &pb.IstioCertificateRequest{Csr: "x"})
				if status.Code(err) != codes.Unauthenticated {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(begin)
	close(errs)
	for err := range errs {
		t.Fatalf("a junk token got %v, want Unauthenticated", err)
	}
	var total float64
	metrics, _ := e.reg.Gather()
	for _, mf := range metrics {
		if mf.GetName() == "meshid_ca_refusals_total" {
			for _, mm := range mf.GetMetric() {
				total += mm.GetCounter().GetValue()
			}
		}
	}
	if total != workers*each {
		t.Errorf("meshid_ca_refusals_total sums to %v, want %d", total, workers*each)
	}
	lines := bytes.Count([]byte(e.logs.String()), []byte("\n"))
	// A burst, then one a second and a summary a second, per reason.
	limit := refusalLogBurst + 2*int(elapsed/refusalLogEvery+2)
	if lines > limit {
		t.Errorf("%d requests in %s wrote %d log lines, want at most %d:\n%s", workers*each, elapsed.Round(time.Millisecond), lines, limit, e.logs.String())
	}
	t.Logf("%d junk-token requests in %s: %d log lines", workers*each, elapsed.Round(time.Millisecond), lines)
}
