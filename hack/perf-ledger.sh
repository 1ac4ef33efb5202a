#!/usr/bin/env bash
# What the ledger costs issuance: BenchmarkIssuanceLedger (CreateCertificate
# over gRPC + TLS on loopback, 64 in flight over 8 connections) with no
# ledger, then SQLite (and PostgreSQL when MESHID_TEST_POSTGRES_DSN is set),
# in alternating rounds so that a noisy machine drifts both alike. Prints
# each round and the median ratio to no ledger. Usage:
#   hack/perf-ledger.sh [rounds (5)] [benchtime (5s)]
#   MESHID_TEST_POSTGRES_DSN=$(hack/postgres.sh) hack/perf-ledger.sh
#
# MESHID_PERF_PROCESS=1: the same comparison with meshid-ca as its own
# process and meshid-load as another (hack/perf-ca.sh: c=64 over 2
# connections, JWKS tokens, the SQLite ledger unless MESHID_PERF_CA_ARGS
# says --ledger=postgres --ledger-dsn=…), the baseline being a benchmark
# build's --bench-record-nothing; the second argument is then each run's
# load duration (default 10s). MESHID_PERF_CA_ARGS: more meshid-ca flags for
# both (e.g. --ledger-commit-delay=2ms).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
benchtime=${2:-5s}
if [ -n "${MESHID_PERF_PROCESS:-}" ]; then
  duration=${2:-10s}
  [ "$duration" = 5s ] && duration=10s
  out=$(mktemp)
  trap 'rm -f "$out"' EXIT
  for r in $(seq "$rounds"); do
    for kind in none ledger; do
      args=${MESHID_PERF_CA_ARGS:-}
      [ "$kind" = none ] && args="$args --bench-record-nothing"
      rate=$(MESHID_PERF_BUILD_TAGS=meshid_bench MESHID_PERF_CA_ARGS="$args" hack/perf-ca.sh -json -limit-duration 0 -duration "$duration" -concurrency 64 |
        grep -o '"e2e_certs_per_sec": *[0-9.]*' | grep -o '[0-9.]*$')
      echo "round $r: $kind $rate certs/s" | tee -a "$out"
    done
  done
  awk '{ v[$3, ++n[$3]] = $4 }
    function median(k, m,   i, j, t, a) { for (i = 1; i <= m; i++) a[i] = v[k, i] + 0
      for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2 }
    END { for (r = 1; r <= n["ledger"]; r++) ratio[r] = v["ledger", r] / v["none", r]
      for (r = 1; r <= n["ledger"]; r++) v["ratio", r] = ratio[r]
      printf "median of %d: no ledger %.0f certs/s, ledger %.0f certs/s, ratio %.3f (per-round ratios:", n["ledger"], median("none", n["none"]), median("ledger", n["ledger"]), median("ratio", n["ledger"])
      for (r = 1; r <= n["ledger"]; r++) printf " %.3f", ratio[r]; print ")" }' "$out"
  exit 0
fi
kinds='none|sqlite'
[ -n "${MESHID_TEST_POSTGRES_DSN:-}" ] && kinds='none|sqlite|postgres'
bin=$(mktemp -d)/server.test
trap 'rm -rf "$(dirname "$bin")"' EXIT
go test -c -o "$bin" ./ca/server
out=$(mktemp)
for r in $(seq "$rounds"); do
  (cd ca/server && "$bin" -test.run '^$' -test.bench "IssuanceLedger/ledger=($kinds)\$" -test.benchtime "$benchtime") |
    grep '^BenchmarkIssuanceLedger' | sed "s/^/round $r: /" | tee -a "$out"
done
awk '
  { for (i = 1; i <= NF; i++) { if ($i == "certs/s") rate = $(i-1); if ($i == "cpu-µs/cert") cpu = $(i-1); if ($i == "ratio-to-none") ratio = $(i-1); if ($i == "records/commit") rpc = $(i-1) }
    split($3, k, "="); kind = k[2]; sub(/-[0-9]+$/, "", kind)
    n[kind]++; rates[kind, n[kind]] = rate; cpus[kind, n[kind]] = cpu; if (kind != "none") { ratios[kind, n[kind]] = ratio; rpcs[kind, n[kind]] = rpc } }
  function median(arr, kind, m,   i, j, t, v) { for (i = 1; i <= m; i++) v[i] = arr[kind, i] + 0
    for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2 }
  END { for (kind in n) { m = n[kind]
      line = sprintf("median of %d: %-8s %6.0f certs/s  %5.0f cpu-µs/cert", m, kind, median(rates, kind, m), median(cpus, kind, m))
      if (kind != "none") line = line sprintf("  ratio %.3f (min %.3f)  %.1f records/commit", median(ratios, kind, m), min_(ratios, kind, m), median(rpcs, kind, m))
      print line } }
  function min_(arr, kind, m,   i, v) { v = arr[kind, 1] + 0; for (i = 2; i <= m; i++) if (arr[kind, i] + 0 < v) v = arr[kind, i] + 0; return v }
' "$out" | sort
rm -f "$out"
