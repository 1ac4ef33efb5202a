package faults

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestSoak is the compressed soak (hack/faults.sh --soak): 20-second
// certificates, so that a workload rotates every 10 s, for at least 100
// rotations each, with the short suite's faults coming round again and
// again (each a quarter of a lifetime). Memory, goroutines and open files of
// each meshid process are sampled throughout and must stay flat: the last
// fifth of the run no higher than the second fifth (after warm-up) by more
// than a margin.
func TestSoak(t *testing.T) {
	if os.Getenv("MESHID_FAULTS_SOAK") != "1" {
		t.Skip("the soak runs with hack/faults.sh --soak (MESHID_FAULTS_SOAK=1), about 20 minutes")
	}
	const ttl = 20 * time.Second
	const rotations = 100
	w := newWorld(t, params{sdsWorkloads: 40, apiWorkloads: 10, ttl: ttl})
	w.waitAllHold(60 * time.Second)

	procs := append([]*proc{w.agent}, w.cas...)
	type sample struct {
		at         time.Duration
		rss        []float64
		goroutines []float64
		fds        []float64
	}
	var samples []sample
	begin := time.Now()
	take := func() {
		s := sample{at: time.Since(begin)}
		for _, p := range procs {
			u, _ := procUsage(p.PID())
			s.rss = append(s.rss, u.RSSMiB)
			s.fds = append(s.fds, float64(u.FDs))
			s.goroutines = append(s.goroutines, p.metric("go_goroutines"))
		}
		samples = append(samples, s)
	}
	fs := faults(ttl, ttl/4)
	var results []*result
	minRotations := func() int {
		least := -1
		for _, wl := range w.workloads {
			s, _, _, _ := wl.snapshot()
			if least < 0 || len(s) < least {
				least = len(s)
			}
		}
		return least
	}
	for i := 0; minRotations() < rotations+1; i++ {
		take()
		// A fault, then a quiet spell of one lifetime.
		r := w.run(fs[i%len(fs)], ttl/4)
		results = append(results, r)
		if t.Failed() {
			break
		}
		quiet := time.Now().Add(ttl)
		for time.Now().Before(quiet) {
			time.Sleep(5 * time.Second) // sampling interval
			take()
		}
		if time.Since(begin) > 45*time.Minute {
			t.Fatalf("only %d rotations per workload after 45 minutes", minRotations()-1)
		}
	}
	take()
	report(t, w, results)

	// Flat: compare the last fifth with the second fifth.
	n := len(samples)
	if n < 10 {
		t.Fatalf("only %d samples", n)
	}
	mean := func(from, to, proc int, pick func(sample) []float64) float64 {
		var sum float64
		for _, s := range samples[from:to] {
			sum += pick(s)[proc]
		}
		return sum / float64(to-from)
	}
	var curve strings.Builder
	fmt.Fprintf(&curve, "t")
	for _, p := range procs {
		fmt.Fprintf(&curve, "\t%s_rss_mib\t%s_goroutines\t%s_fds", p.name, p.name, p.name)
	}
	curve.WriteString("\n")
	for _, s := range samples {
		fmt.Fprintf(&curve, "%.0f", s.at.Seconds())
		for i := range procs {
			fmt.Fprintf(&curve, "\t%.1f\t%.0f\t%.0f", s.rss[i], s.goroutines[i], s.fds[i])
		}
		curve.WriteString("\n")
	}
	if f := os.Getenv("MESHID_FAULTS_REPORT"); f != "" {
		os.WriteFile(f+".soak", []byte(curve.String()), 0o644)
	}
	for i, p := range procs {
		for _, m := range []struct {
			what   string
			pick   func(sample) []float64
			factor float64
			slack  float64
		}{
			{"RSS MiB", func(s sample) []float64 { return s.rss }, 1.3, 10},
			{"goroutines", func(s sample) []float64 { return s.goroutines }, 1.2, 20},
			{"open files", func(s sample) []float64 { return s.fds }, 1.2, 10},
		} {
			early, late := mean(n/5, 2*n/5, i, m.pick), mean(4*n/5, n, i, m.pick)
			t.Logf("%s %s: %.1f → %.1f", p.name, m.what, early, late)
			if late > early*m.factor+m.slack {
				t.Errorf("%s %s grew from %.1f to %.1f over the soak", p.name, m.what, early, late)
			}
		}
	}
	t.Logf("%d rotations per workload at least, in %s", minRotations()-1, time.Since(begin).Round(time.Second))
}
