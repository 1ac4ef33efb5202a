#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine (internal/cluster):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, a kubelet on
# containerd + runc + the CNI bridge (Debian's packages), kube-proxy
# (iptables), CoreDNS, and a PostgreSQL server for the chart's ledger. No
# image is pulled: the sandbox image is built here (hack/images pause) and
# others are loaded from archives.
#
#   hack/cluster.sh up                  # builds what is missing, starts it (~10 s warm)
#   hack/cluster.sh load dist/images/*.tar
#   eval "$(hack/cluster.sh env)"       # KUBECONFIG, and kubectl on PATH
#   hack/cluster.sh status
#   hack/cluster.sh dsn                 # the ledger database's URL, reachable from pods
#   hack/cluster.sh down                # removes all of it
#
# Needs root (or password-less sudo), and Debian's containerd, runc,
# containernetworking-plugins, iptables and postgresql (hack/deps.sh
# installs them). Everything binds to the node IP 10.221.0.1, added to lo;
# pods get 10.222.0.0/24, Services 10.223.0.0/24. State and logs live in
# $MESHID_CLUSTER_DIR (default /var/lib/meshid-cluster; logs/ per component).
# up refuses, saying why, when a prerequisite is missing or a port is taken;
# if it fails or is interrupted it removes what it started. down also
# removes what a killed up left behind.
#
# MESHID_CLUSTER_FEATURE_GATES and MESHID_CLUSTER_RUNTIME_CONFIG pass
# --feature-gates to every component and --runtime-config to the API server.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
case "$cmd" in
up | down | status | env | load | dsn) shift ;;
-h | --help | "")
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
	[[ -n $cmd ]]
	exit
	;;
*)
	echo "cluster.sh: unknown command '$cmd' (up, down, status, env, load, dsn)" >&2
	exit 2
	;;
esac

if [[ $(id -u) -ne 0 ]]; then
	if sudo -n true 2>/dev/null; then
		exec sudo -n --preserve-env=PATH,HOME,MESHID_CACHE_DIR,MESHID_CLUSTER_DIR,MESHID_CLUSTER_FEATURE_GATES,MESHID_CLUSTER_RUNTIME_CONFIG,GOFLAGS,GOPROXY "$0" "$cmd" "$@"
	fi
	echo "cluster.sh: needs root or password-less sudo (containerd, mounts, cgroups, iptables)" >&2
	exit 1
fi

cache_root=${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}
mkdir -p "$cache_root/bin"
tool=$cache_root/bin/meshid-cluster
go build -o "$tool" ./hack/cluster

case "$cmd" in
up)
	kube=$(hack/kube-assets.sh)
	node=$(hack/kube-node.sh)
	go run ./hack/images -o "$cache_root/cluster-images" pause >/dev/null
	exec "$tool" up --bin-path "$kube:$node" --pause-archive "$cache_root/cluster-images/pause.tar" "$@"
	;;
env)
	"$tool" env "$@"
	node=$(hack/kube-node.sh 2>/dev/null)
	echo "export PATH=$node:\$PATH"
	;;
*)
	exec "$tool" "$cmd" "$@"
	;;
esac
