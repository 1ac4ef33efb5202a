#!/usr/bin/env bash
# Measures meshid-ca's issuance throughput end to end (real gRPC + TLS on
# loopback, load generator on the same machine) against the in-process
# signing limit measured in the same run. Extra arguments go to meshid-load,
# e.g.: hack/perf-ca.sh -concurrency 64 -duration 20s
set -euo pipefail
cd "$(dirname "$0")/.."
# MESHID_PERF_BUILD_TAGS=meshid_bench adds meshid-ca's --bench-record-nothing
# (hack/perf-ledger.sh's process mode); never in a release build.
# A tagged build goes to a directory of its own, never over bin/meshid-ca.
out=bin
[ -n "${MESHID_PERF_BUILD_TAGS:-}" ] && out=bin/tagged-$MESHID_PERF_BUILD_TAGS
go build ${MESHID_PERF_BUILD_TAGS:+-tags "$MESHID_PERF_BUILD_TAGS"} -o "$out/" ./cmd/meshid-ca ./cmd/meshid-load
dir=$(mktemp -d)
ca_pid=
cleanup() {
  if [ -n "$ca_pid" ]; then kill "$ca_pid" 2>/dev/null || true; wait "$ca_pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
grpc=127.0.0.1:${MESHID_PERF_GRPC_PORT:-25012}
http=127.0.0.1:${MESHID_PERF_HTTP_PORT:-25014}
"$out/meshid-load" -token-issuer-key "$dir/issuer-key.pem" -print-jwks >"$dir/jwks.json"
# Rate limits off (per pod, per namespace, global): the load sends many
# certificates per identity, from one namespace, on purpose.
env ${MESHID_PERF_CA_ENV:-} "$out/meshid-ca" --state-dir "$dir/state" --auth jwks --jwks-file "$dir/jwks.json" \
  --token-issuer https://meshid-demo.local --grpc-addr "$grpc" --http-addr "$http" \
  --rate-limit 0 --namespace-rate-limit 0 --global-rate-limit 0 --bundle-endpoint-addr= ${MESHID_PERF_CA_ARGS:-} 2>"$dir/ca.log" &
ca_pid=$!
for _ in $(seq 100); do
  curl -fsS "http://$http/readyz" >/dev/null 2>&1 && break
  kill -0 "$ca_pid" 2>/dev/null || { cat "$dir/ca.log" >&2; exit 1; }
  sleep 0.1
done
"$out/meshid-load" -addr "$grpc" -root-file "$dir/state/ca/root-cert.pem" -token-issuer-key "$dir/issuer-key.pem" "$@"
echo "meshid-ca log lines: $(wc -l <"$dir/ca.log"); CPU seconds used by meshid-ca: $(ps -o cputime= -p "$ca_pid")"
if [ -n "${MESHID_PERF_METRICS:-}" ]; then curl -fsS "http://$http/metrics" | grep -E '^meshid_ca_issuance_duration_seconds_bucket|^go_gc_duration_seconds|^go_memstats_heap_alloc|process_resident'; fi
