#!/usr/bin/env bash
# Runs every test of meshid, as CI does, on a fresh Debian machine:
#   1. installs the Debian packages of hack/deps.txt that are missing
#      (hack/deps.sh: gcc, PostgreSQL, SoftHSM2, containerd, runc, ...);
#   2. builds the real parts from the Go module proxy when they are not
#      cached: kube-apiserver and etcd, Istio's pilot-agent, step-ca, and
#      the cluster's kubelet, controller-manager, scheduler, kube-proxy and
#      CoreDNS (hack/kube-node.sh);
#   3. starts a local PostgreSQL for the ledger tests;
#   4. gofmt, go vet, the unit and end-to-end tests with the race detector,
#      each fuzz target for FUZZTIME (default 5s);
#   5. the end-to-end test on a real single-node cluster
#      (hack/cluster-test.sh), beside the fuzzing of step 4.
#
#   hack/test.sh                # everything (times in the README)
#   hack/test.sh --no-cluster   # all but step 5, for a machine that cannot
#                               # run containers (it says so at the end)
#
# Real parts are required here: a test that cannot find them fails instead of
# skipping. Plain `go test ./...` skips them with the command that builds them.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=1
for arg in "$@"; do
	case "$arg" in
	--no-cluster) cluster=0 ;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
		exit 0
		;;
	*)
		echo "test.sh: unknown argument '$arg' (usage: hack/test.sh [--no-cluster])" >&2
		exit 2
		;;
	esac
done

echo "== Debian packages (hack/deps.sh installs what hack/deps.txt lists and is missing)" >&2
hack/deps.sh

echo "== real parts (cached under ${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid})" >&2
KUBEBUILDER_ASSETS=$(hack/kube-assets.sh)
MESHID_PILOT_AGENT_DIR=$(hack/pilot-agent.sh)
MESHID_STEP_CA_DIR=$(hack/step-ca.sh)
if ((cluster)); then
	hack/kube-node.sh >/dev/null
fi
export KUBEBUILDER_ASSETS MESHID_PILOT_AGENT_DIR MESHID_STEP_CA_DIR
echo "== PostgreSQL for the ledger tests (hack/postgres.sh)" >&2
# Stopped again at the end if this run started it; left running if it was.
MESHID_POSTGRES_STARTED=$(mktemp)
export MESHID_POSTGRES_STARTED
stop_postgres() {
	if read -r version name <"$MESHID_POSTGRES_STARTED" 2>/dev/null && [[ -n ${name:-} ]]; then
		echo "== stopping the PostgreSQL cluster $version/$name this run started" >&2
		if [[ $(id -u) -eq 0 ]]; then
			pg_ctlcluster "$version" "$name" stop || true
		else
			sudo -n pg_ctlcluster "$version" "$name" stop || true
		fi
	fi
	rm -f "$MESHID_POSTGRES_STARTED"
}
trap stop_postgres EXIT
MESHID_TEST_POSTGRES_DSN=$(hack/postgres.sh)
export MESHID_TEST_POSTGRES_DSN
export MESHID_REQUIRE_KUBE=1 MESHID_REQUIRE_ISTIO=1 MESHID_REQUIRE_POSTGRES=1
# HSM: SoftHSM2, Debian's softhsm2 package (hack/deps.sh installs it).
export MESHID_REQUIRE_STEP=1 MESHID_REQUIRE_HSM=1

echo "== gofmt, go vet" >&2
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './hack/*'))
if [[ -n $unformatted ]]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi
go vet ./...
# The cloud KMS backends (awskms, cloudkms, azurekms) are built only with
# -tags meshid_cloudkms: vet compiles that build so their code paths keep
# compiling (no cloud is reached by any test).
go vet -tags meshid_cloudkms ./ca/keys ./cmd/meshid-ca
# ...and that their URIs reach the backend (which fails before any network).
go test -count=1 -tags meshid_cloudkms -run TestCloudKMS ./ca/keys

echo "== go test -race ./..." >&2
# -p 2: two packages at a time on this project's 2-core machines.
go test -race -count=1 -p 2 -timeout 20m ./...

# The cluster test mostly waits (for rotations, for a Lease to expire), and
# fuzzing keeps both cores busy: they run side by side, the cluster test's
# output kept until it ends.
cluster_pid=""
cluster_log=""
if ((cluster)); then
	echo "== meshid on a real single-node cluster (hack/cluster-test.sh), beside fuzzing" >&2
	cluster_log=$(mktemp)
	hack/cluster-test.sh >"$cluster_log" 2>&1 &
	cluster_pid=$!
	# On failure or Ctrl-C: stop the cluster test (its go test first), which
	# takes its cluster down.
	trap 'pkill -TERM -P $cluster_pid 2>/dev/null; kill $cluster_pid 2>/dev/null; wait $cluster_pid 2>/dev/null; stop_postgres' EXIT
fi

echo "== fuzz targets, ${FUZZTIME:-5s} each" >&2
fuzz_ok=1
FUZZTIME=${FUZZTIME:-5s} hack/fuzz.sh || fuzz_ok=0

cluster_ok=1
if ((cluster)); then
	wait "$cluster_pid" || cluster_ok=0
	trap stop_postgres EXIT
	if ((cluster_ok)); then
		grep -E '^(--- |ok|PASS|FAIL)|cluster_test.go:[0-9]+: +[0-9.]+s ' "$cluster_log" >&2 || true
	else
		cat "$cluster_log" >&2
	fi
	rm -f "$cluster_log"
fi
if ((!fuzz_ok || !cluster_ok)); then
	((fuzz_ok)) || echo "== fuzzing failed" >&2
	((cluster_ok)) || echo "== the cluster test failed (its output above)" >&2
	exit 1
fi
if ((cluster)); then
	echo "== all tests passed" >&2
else
	echo "== all tests passed, but not the cluster test (--no-cluster): hack/cluster-test.sh runs it" >&2
fi
