#!/usr/bin/env bash
# Builds the rest of hack/cluster.sh's cluster from the Go module proxy and
# prints the directory that holds it: kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy and kubectl from k8s.io/kubernetes (the wrapper
# module hack/kube-node, at the Kubernetes version of hack/kube-apiserver),
# and CoreDNS (the wrapper module hack/coredns).
#
#   hack/kube-node.sh            # prints the directory
#   hack/kube-node.sh --force    # rebuilds
#
# Output directory:
#   ${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}/kube-node/<k8s version>/
#
# A binary is rebuilt only when its wrapper's go.mod, go.sum or sources, or
# the ldflags, changed. Cold: about 4 minutes on 2 cores (most of
# Kubernetes' packages are shared with kube-apiserver's build, so after
# hack/kube-assets.sh it is less); warm: instant. Progress goes to stderr;
# stdout carries only the directory.
set -euo pipefail

force=0
for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
		exit 0
		;;
	*)
		echo "kube-node: unknown argument: $arg (usage: $0 [--force])" >&2
		exit 2
		;;
	esac
done

log() { printf 'kube-node: %s\n' "$*" >&2; }
hack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit }' "$hack_dir/kube-node/go.mod")
api_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$hack_dir/kube-apiserver/go.mod")
if [[ ! $k8s_version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
	echo "kube-node: cannot read the k8s.io/kubernetes version from hack/kube-node/go.mod (got '$k8s_version')" >&2
	exit 1
fi
if [[ $k8s_version != "$api_version" ]]; then
	echo "kube-node: hack/kube-node is at $k8s_version but hack/kube-apiserver at $api_version: keep them at one version" >&2
	exit 1
fi
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}

cache_root=${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}
[[ $cache_root == /* ]] || cache_root=$PWD/$cache_root
out_dir=$cache_root/kube-node/$k8s_version
mkdir -p "$out_dir"

ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done

inputs_hash() { # <wrapper dir> <ldflags>
	{
		cat "$1/go.mod" "$1/go.sum"
		find "$1" -name '*.go' -print0 | sort -z | xargs -0 cat
		printf '%s\n' "$2"
	} | sha256sum | cut -d' ' -f1
}
up_to_date() { # <stamp name> <hash> <binary>...
	local stamp=$1 hash=$2
	shift 2
	[[ $force -eq 0 && -f $out_dir/.$stamp.inputs && $(<"$out_dir/.$stamp.inputs") == "$hash" ]] || return 1
	local b
	for b in "$@"; do [[ -x $out_dir/$b ]] || return 1; done
}

exec 9>"$out_dir/.lock"
if ! flock -n 9; then
	log "waiting for another kube-node build to finish"
	flock 9
fi

tmp=$(mktemp -d "$out_dir/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

build() { # <stamp> <wrapper dir> <ldflags> <label> <package>...
	local stamp=$1 src=$2 flags=$3 label=$4
	shift 4
	local names=() p
	for p in "$@"; do names+=("$(basename "$p")"); done
	[[ $# -eq 1 && $1 == . ]] && names=("$stamp")
	local hash
	hash=$(inputs_hash "$src" "$flags")
	if up_to_date "$stamp" "$hash" "${names[@]}"; then
		log "${names[*]} $label up to date"
		return
	fi
	local start=$SECONDS
	log "building ${names[*]} $label (cold: a few minutes)"
	if [[ $# -eq 1 && $1 == . ]]; then
		(cd "$src" && GOWORK=off CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags="$flags" -o "$tmp/$stamp" .) >&2
	else
		(cd "$src" && GOWORK=off CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags="$flags" -o "$tmp/" "$@") >&2
	fi
	for p in "${names[@]}"; do
		"$tmp/$p" --version >/dev/null 2>&1 || "$tmp/$p" -version >/dev/null 2>&1 || "$tmp/$p" version --client >/dev/null 2>&1 || {
			echo "kube-node: the freshly built $p does not run" >&2
			exit 1
		}
		mv -f "$tmp/$p" "$out_dir/$p"
	done
	printf '%s\n' "$hash" >"$out_dir/.$stamp.inputs"
	log "built ${names[*]} in $((SECONDS - start))s"
}

build kubernetes "$hack_dir/kube-node" "$ldflags" "$k8s_version" ./kubelet ./kube-controller-manager ./kube-scheduler ./kube-proxy ./kubectl
coredns_version=$(awk '$1 == "require" && $2 == "github.com/coredns/coredns" { print $3; exit } $1 == "github.com/coredns/coredns" { print $2; exit }' "$hack_dir/coredns/go.mod")
build coredns "$hack_dir/coredns" "-s -w" "$coredns_version" .

printf '%s\n' "$out_dir"
