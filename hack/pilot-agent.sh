#!/usr/bin/env bash
# Builds Istio's real node agent (pilot-agent) from the Go module proxy, for
# interop tests against meshid's CA, and caches it.
#
# Usage: hack/pilot-agent.sh [--force]
#
# Prints ONLY the absolute directory holding the result on stdout:
#   <dir>/pilot-agent                 the binary
#   <dir>/envoy_bootstrap_tmpl.json   Envoy bootstrap template the agent needs at
#                                     ./var/lib/istio/envoy/envoy_bootstrap_tmpl.json
#                                     (relative to its working directory)
# where <dir> = ${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}/istio/<istio version>.
# The version is the one pinned in hack/pilot-agent/go.mod. Builds only when the
# files are missing (cold: a few minutes, ~0.6 GB of modules); --force rebuilds.
# Progress goes to stderr.
set -euo pipefail

force=0
for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
		exit 0
		;;
	*)
		echo "pilot-agent.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

moddir="$(cd "$(dirname "${BASH_SOURCE[0]}")/pilot-agent" && pwd)"
version="$(awk '$1 == "istio.io/istio" { print $2; exit }' "$moddir/go.mod")"
if [[ -z "$version" ]]; then
	echo "pilot-agent.sh: no istio.io/istio requirement in $moddir/go.mod" >&2
	exit 1
fi

cache_root="${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}"
mkdir -p "$cache_root"
cache_root="$(cd "$cache_root" && pwd)"
outdir="$cache_root/istio/$version"

# .static marks a binary built with CGO_ENABLED=0, which also runs in an
# image with no C library (e2e/cluster); older caches are rebuilt.
if [[ $force -eq 0 && -x "$outdir/pilot-agent" && -s "$outdir/envoy_bootstrap_tmpl.json" && -e "$outdir/.static" ]]; then
	echo "$outdir"
	exit 0
fi

command -v go >/dev/null || {
	echo "pilot-agent.sh: go is not on PATH" >&2
	exit 1
}

mkdir -p "$outdir"
tmpdir="$(mktemp -d "$outdir/.build.XXXXXX")"
trap 'rm -rf "$tmpdir"' EXIT

echo "pilot-agent.sh: building istio.io/istio@$version pilot-agent into $outdir (a few minutes when cold)" >&2
start=$SECONDS
(
	cd "$moddir"
	# GOWORK=off: never let a go.work above this directory take over.
	# -mod=readonly on the command line wins over any -mod in GOFLAGS.
	# CGO_ENABLED=0: static, as Istio's own images ship it.
	export GOWORK=off CGO_ENABLED=0
	go build -mod=readonly -p 2 -trimpath -ldflags='-s -w' \
		-o "$tmpdir/pilot-agent" istio.io/istio/pilot/cmd/pilot-agent
	istio_dir="$(go list -mod=readonly -m -f '{{.Dir}}' istio.io/istio)"
	cp "$istio_dir/tools/packaging/common/envoy_bootstrap.json" "$tmpdir/envoy_bootstrap_tmpl.json"
	chmod 0644 "$tmpdir/envoy_bootstrap_tmpl.json" # module cache files are read-only
) >&2

# Template first, binary last: the binary's presence marks a complete install.
mv -f "$tmpdir/envoy_bootstrap_tmpl.json" "$outdir/envoy_bootstrap_tmpl.json"
mv -f "$tmpdir/pilot-agent" "$outdir/pilot-agent"
touch "$outdir/.static"
echo "pilot-agent.sh: built in $((SECONDS - start))s" >&2
echo "$outdir"
