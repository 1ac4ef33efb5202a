#!/usr/bin/env bash
# The fault-injection suite (e2e/faults): meshid-ca (two replicas on
# PostgreSQL), meshid-agent in node mode and simulated workloads on a real
# kube-apiserver, with faults injected one after another while they serve
# and every invariant checked after each (see e2e/faults/doc.go).
#
#   hack/faults.sh            # the short suite, as hack/test.sh runs it (~3.5 min)
#   hack/faults.sh --soak     # also the compressed soak: 100+ rotations per
#                             # workload under repeated faults (~20 min),
#                             # memory, goroutines and open files sampled
#
# MESHID_FAULTS_REPORT=FILE writes the faults × invariants table there
# (and FILE.soak the soak's curves). Needs what hack/test.sh builds:
# kube-apiserver and etcd, and a PostgreSQL server (hack/postgres.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

run='TestFaults'
timeout=10m
for arg in "$@"; do
	case "$arg" in
	--soak)
		run='TestFaults|TestSoak$'
		export MESHID_FAULTS_SOAK=1
		timeout=60m
		;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
		exit 0
		;;
	*)
		echo "faults.sh: unknown argument '$arg' (usage: hack/faults.sh [--soak])" >&2
		exit 2
		;;
	esac
done

KUBEBUILDER_ASSETS=$(hack/kube-assets.sh)
export KUBEBUILDER_ASSETS
if [[ -z ${MESHID_TEST_POSTGRES_DSN:-} ]]; then
	MESHID_TEST_POSTGRES_DSN=$(hack/postgres.sh)
	export MESHID_TEST_POSTGRES_DSN
fi
export MESHID_REQUIRE_KUBE=1 MESHID_REQUIRE_POSTGRES=1
go test -count=1 -timeout "$timeout" -v -run "$run" ./e2e/faults
