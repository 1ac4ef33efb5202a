#!/usr/bin/env bash
# Builds the envtest control plane (kube-apiserver and etcd) from the Go module
# proxy and prints the directory that holds them, for KUBEBUILDER_ASSETS:
#
#   KUBEBUILDER_ASSETS=$(hack/kube-assets.sh) go test ./...
#
# No release tarballs are downloaded: the binaries are compiled from the wrapper
# modules hack/kube-apiserver (k8s.io/kubernetes) and hack/etcd
# (go.etcd.io/etcd/server/v3), whose go.mod/go.sum pin the versions.
#
# Output directory:
#   ${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}/kube-assets/<k8s version>/
#
# A binary is built only when it is missing or its inputs (the wrapper's go.mod,
# go.sum, main.go and the ldflags) changed, so a warm run is instant. A cold
# build takes several minutes and a few GiB of memory (kube-apiserver's link is
# the peak). Builds go to a temp file that is renamed into place, so an
# interrupted build never leaves a half-written binary.
#
# Progress goes to stderr; stdout carries only the absolute directory path.
#
# Usage: hack/kube-assets.sh [--force]
#   --force   rebuild both binaries even if they are up to date
#
# Honoured environment: MESHID_CACHE_DIR, XDG_CACHE_HOME, GOFLAGS (e.g. -p=2 to
# limit parallel compiles), GOPROXY and the other usual Go variables.
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
		echo "kube-assets: unknown argument: $arg (usage: $0 [--force])" >&2
		exit 2
		;;
	esac
done

log() { printf 'kube-assets: %s\n' "$*" >&2; }

hack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

# Version of a required module, read from a wrapper's go.mod.
modversion() { # <go.mod> <module path>
	awk -v m="$2" '
		$1 == "require" && $2 == m && $3 ~ /^v/ { print $3; exit }
		$1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}

k8s_version=$(modversion "$hack_dir/kube-apiserver/go.mod" k8s.io/kubernetes)
etcd_version=$(modversion "$hack_dir/etcd/go.mod" go.etcd.io/etcd/server/v3)
if [[ ! $k8s_version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
	echo "kube-assets: cannot read the k8s.io/kubernetes version from hack/kube-apiserver/go.mod (got '$k8s_version')" >&2
	exit 1
fi
k8s_major=${BASH_REMATCH[1]}
k8s_minor=${BASH_REMATCH[2]}
if [[ -z $etcd_version ]]; then
	echo "kube-assets: cannot read the etcd version from hack/etcd/go.mod" >&2
	exit 1
fi

cache_root=${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}
[[ $cache_root == /* ]] || cache_root=$PWD/$cache_root
out_dir=$cache_root/kube-assets/$k8s_version

# Same variables Kubernetes' own build stamps (hack/lib/version.sh); without them
# kube-apiserver reports a placeholder version (v0.0.0-master+$Format:%H$).
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	version_ldflags+=" -X $pkg.gitVersion=$k8s_version"
	version_ldflags+=" -X $pkg.gitMajor=$k8s_major"
	version_ldflags+=" -X $pkg.gitMinor=$k8s_minor"
	version_ldflags+=" -X $pkg.gitTreeState=clean"
done
apiserver_ldflags="-s -w$version_ldflags"
etcd_ldflags="-s -w"

# Fingerprint of everything that decides a binary's content.
inputs_hash() { # <wrapper dir> <ldflags>
	{
		cat "$1/go.mod" "$1/go.sum" "$1/main.go"
		printf '%s\n' "$2"
	} | sha256sum | cut -d' ' -f1
}

apiserver_hash=$(inputs_hash "$hack_dir/kube-apiserver" "$apiserver_ldflags")
etcd_hash=$(inputs_hash "$hack_dir/etcd" "$etcd_ldflags")

up_to_date() { # <binary name> <hash>
	[[ $force -eq 0 && -x $out_dir/$1 && -f $out_dir/.$1.inputs ]] &&
		[[ $(<"$out_dir/.$1.inputs") == "$2" ]]
}

if up_to_date kube-apiserver "$apiserver_hash" && up_to_date etcd "$etcd_hash"; then
	printf '%s\n' "$out_dir"
	exit 0
fi

mkdir -p "$out_dir"

# Serialise concurrent runs (e.g. parallel make jobs) so they don't build twice.
exec 9>"$out_dir/.lock"
if command -v flock >/dev/null 2>&1; then
	if ! flock -n 9; then
		log "waiting for another kube-assets build to finish"
		flock 9
	fi
fi

tmp_files=()
cleanup() {
	local f
	for f in "${tmp_files[@]+"${tmp_files[@]}"}"; do rm -f -- "$f"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

build() { # <binary name> <wrapper dir> <ldflags> <hash> <version label>
	local name=$1 src=$2 ldflags=$3 hash=$4 label=$5
	if up_to_date "$name" "$hash"; then
		log "$name $label is up to date"
		return
	fi
	local tmp start
	# Leftovers of a build that was killed outright (SIGKILL, power loss).
	rm -f -- "$out_dir/.$name.tmp."*
	tmp=$(mktemp "$out_dir/.$name.tmp.XXXXXX")
	tmp_files+=("$tmp")
	start=$SECONDS
	log "building $name $label into $out_dir (a cold build takes several minutes)"
	(
		cd "$src"
		# GOWORK=off: a go.work at the repo root must not pull the wrapper in.
		# CGO_ENABLED=0: static binaries, as the upstream releases are built.
		# -buildvcs=false: no git stamping (works from a tarball or a git-less box).
		GOWORK=off CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags="$ldflags" -o "$tmp" .
	) >&2
	# Smoke test before publishing the binary.
	if ! "$tmp" --version >/dev/null 2>&1; then
		echo "kube-assets: the freshly built $name does not run ('$name --version' failed)" >&2
		exit 1
	fi
	chmod 0755 "$tmp"
	mv -f -- "$tmp" "$out_dir/$name"
	printf '%s\n' "$hash" >"$out_dir/.$name.inputs.tmp"
	mv -f -- "$out_dir/.$name.inputs.tmp" "$out_dir/.$name.inputs"
	log "built $name $label in $((SECONDS - start))s"
}

build kube-apiserver "$hack_dir/kube-apiserver" "$apiserver_ldflags" "$apiserver_hash" "$k8s_version"
build etcd "$hack_dir/etcd" "$etcd_ldflags" "$etcd_hash" "$etcd_version"

printf '%s\n' "$out_dir"
