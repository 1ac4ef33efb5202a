#!/usr/bin/env bash
# The restart-storm and token-flood benchmark of docs/performance.md: a real
# kube-apiserver and etcd (built and cached by hack/kube-assets.sh), N pods
# with pod-bound tokens from TokenRequest asking meshid-ca (a process, every
# flag at its default, SQLite ledger on) for their first certificate at once,
# 256 in flight, with istio-agent's retries; each size in three modes (jwks,
# the in-run baseline; kubernetes, the default; tokenreview), without and
# with four clients flooding the CA with bad tokens. Prints a table; the
# results also go to $MESHID_STORM_OUT (default /tmp/meshid-storm.json).
#
#   hack/storm.sh                                  # 2000/100, 10000/100, 1000/100, 1000/1: about 5 minutes
#   MESHID_STORM_SIZES=500/10 hack/storm.sh        # pods/service-accounts, comma-separated
#   MESHID_STORM_MODES=kubernetes MESHID_STORM_FLOOD=0 hack/storm.sh
#   MESHID_STORM_PROFILE=/tmp MESHID_STORM_CA_FLAGS=--profiling hack/storm.sh   # CPU profiles of meshid-ca
set -euo pipefail
cd "$(dirname "$0")/.."
KUBEBUILDER_ASSETS=$(hack/kube-assets.sh)
export KUBEBUILDER_ASSETS MESHID_STORM=1 MESHID_REQUIRE_KUBE=1
go test ./e2e -run '^TestStormBenchmark$' -count=1 -v -timeout 60m 2>&1 |
	grep -v -e '^=== ' -e '^    [[:space:]]*meshid_' -e '^[[:space:]]*$'
