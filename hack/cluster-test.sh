#!/usr/bin/env bash
# The end-to-end test on a real cluster (e2e/cluster): brings up
# hack/cluster.sh's single-node cluster, installs meshid's chart into it with
# the Helm SDK from images built from this checkout, runs TestMeshidOnCluster
# (readiness under Pod Security, a pod certificate from meshid's
# PodCertificateRequest signer, Istio's pilot-agent in a pod, go-spiffe mTLS
# across rotations, identity theft refused, a deleted pod not renewed,
# meshidctl through port-forward, the leader killed with no certificate
# lapsing) and takes the cluster down again, also on failure or Ctrl-C.
#
#   hack/cluster-test.sh             # about 3 minutes warm
#   MESHID_CLUSTER_REUSE=1 hack/cluster-test.sh   # on a cluster already up; leaves it up
#   MESHID_CLUSTER_KEEP=1 ...        # leave the release installed to look at it
#   MESHID_CLUSTER_PODCERT_REFRESH=1 MESHID_CLUSTER_TEST=TestPodCertificateRefresh hack/cluster-test.sh
#                                    # the kubelet renewing a pod certificate (~15 min)
#
# The Ready timeline and memory per process are logged and written to
# $MESHID_CLUSTER_REPORT when set. Needs what hack/cluster.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."

MESHID_PILOT_AGENT_DIR=$(hack/pilot-agent.sh)
export MESHID_PILOT_AGENT_DIR
export MESHID_CLUSTER_DIR=${MESHID_CLUSTER_DIR:-/var/lib/meshid-cluster}
# Pod Certificates and ClusterTrustBundles (beta, off by default), for the
# pod-certificate signer's part of the test.
export MESHID_CLUSTER_FEATURE_GATES=${MESHID_CLUSTER_FEATURE_GATES-PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true}
export MESHID_CLUSTER_RUNTIME_CONFIG=${MESHID_CLUSTER_RUNTIME_CONFIG-certificates.k8s.io/v1beta1=true}

if [[ ${MESHID_CLUSTER_REUSE:-} == 1 ]] && hack/cluster.sh status >/dev/null 2>&1; then
	echo "cluster-test: using the cluster up in $MESHID_CLUSTER_DIR" >&2
else
	trap 'hack/cluster.sh down' EXIT
	trap 'exit 130' INT TERM # so that EXIT's trap runs
	hack/cluster.sh up
fi

sudo=()
[[ $(id -u) -ne 0 ]] && sudo=(sudo -n --preserve-env)
# The test reads the node's /proc, its agent socket and its pod IPs: root.
# MESHID_CLUSTER_TEST picks another test, e.g. TestPodCertificateRefresh
# (with MESHID_CLUSTER_PODCERT_REFRESH=1; about 15 minutes).
MESHID_REQUIRE_CLUSTER=1 "${sudo[@]}" go test -count=1 -timeout 40m -v -run "^${MESHID_CLUSTER_TEST:-TestMeshidOnCluster}\$" ./e2e/cluster
