#!/usr/bin/env bash
# Builds SPIFFE's real SPIRE server and agent from the Go module proxy, for
# interop and federation tests against meshid, and caches them.
#
# Usage: hack/spire.sh [--force]
#
# Prints ONLY the absolute directory holding the result on stdout:
#   <dir>/spire-server   the server binary
#   <dir>/spire-agent    the agent binary
# where <dir> = ${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}/spire/<version>.
# The version is the one pinned in hack/spire/go.mod. Both are built with cgo
# (SPIRE's sqlite3 datastore needs it) and linked statically against glibc, so
# they also run in an image with no C library. Needs gcc and libc6-dev. Builds
# only when a binary is missing or hack/spire/go.mod, go.sum or this script
# changed (cold, 2 cores: about 20 minutes, 0.6 GB of module downloads);
# --force rebuilds. Concurrent runs wait for each other. Progress goes to
# stderr.
set -euo pipefail

force=0
for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
		exit 0
		;;
	*)
		echo "spire.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

moddir="$(cd "$(dirname "${BASH_SOURCE[0]}")/spire" && pwd)"
version="$(awk '$1 == "github.com/spiffe/spire" && $2 ~ /^v/ { print $2; exit }' "$moddir/go.mod")"
if [[ -z "$version" ]]; then
	echo "spire.sh: no github.com/spiffe/spire requirement in $moddir/go.mod" >&2
	exit 1
fi

cache_root="${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}"
mkdir -p "$cache_root"
cache_root="$(cd "$cache_root" && pwd)"
outdir="$cache_root/spire/$version"

# The inputs' digest is kept next to the binaries: a change to the pinned
# modules or to how they are built makes the next run rebuild.
inputs_sum="$(cat "$moddir/go.mod" "$moddir/go.sum" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"

is_current() {
	[[ -x "$outdir/spire-server" && -x "$outdir/spire-agent" &&
		"$(cat "$outdir/.inputs" 2>/dev/null)" == "$inputs_sum" ]]
}

if [[ $force -eq 0 ]] && is_current; then
	echo "$outdir"
	exit 0
fi

command -v go >/dev/null || {
	echo "spire.sh: go is not on PATH" >&2
	exit 1
}
command -v gcc >/dev/null || {
	echo "spire.sh: gcc is not on PATH (SPIRE's sqlite3 datastore needs cgo)" >&2
	exit 1
}

mkdir -p "$outdir"
# Serialise concurrent runs so they do not build twice; the second one finds
# the binaries the first one built (unless --force).
exec 9>"$outdir/.lock"
if command -v flock >/dev/null 2>&1; then
	if ! flock -n 9; then
		echo "spire.sh: waiting for another SPIRE build to finish" >&2
		flock 9
	fi
	if [[ $force -eq 0 ]] && is_current; then
		echo "$outdir"
		exit 0
	fi
fi

tmpdir="$(mktemp -d "$outdir/.build.XXXXXX")"
trap 'rm -rf "$tmpdir"' EXIT

echo "spire.sh: building github.com/spiffe/spire@$version spire-server and spire-agent into $outdir (several minutes when cold)" >&2
start=$SECONDS
(
	cd "$moddir"
	# GOWORK=off: never let a go.work above this directory take over.
	# -mod=readonly on the command line wins over any -mod in GOFLAGS.
	# CGO_ENABLED=1: without cgo SPIRE's sql datastore refuses sqlite3
	# ("sqlite3 is not a supported dialect when CGO is not enabled").
	# Static link (as SPIRE's own build-static, though against glibc, not
	# musl): netgo/osusergo keep glibc's NSS (dlopen) out of the binary;
	# sqlite_omit_load_extension keeps sqlite's dlopen out.
	# gittag: the version string SPIRE's release builds report ("1.13.3").
	export GOWORK=off CGO_ENABLED=1
	ldflags="-s -w -X github.com/spiffe/spire/pkg/common/version.gittag=${version#v}"
	ldflags+=" -linkmode external -extldflags -static"
	for bin in spire-server spire-agent; do
		go build -mod=readonly -p 2 -trimpath \
			-tags 'netgo osusergo sqlite_omit_load_extension' \
			-ldflags="$ldflags" \
			-o "$tmpdir/$bin" "github.com/spiffe/spire/cmd/$bin"
	done
) >&2
# Smoke test before publishing the binaries.
for bin in spire-server spire-agent; do
	if ! "$tmpdir/$bin" --version >/dev/null 2>&1; then
		echo "spire.sh: the freshly built $bin does not run ('$bin --version' failed)" >&2
		exit 1
	fi
done

# Drop the digest first, then the binaries (each an atomic rename), then the
# new digest: a run cut short in between leaves a cache that rebuilds.
rm -f "$outdir/.inputs"
mv -f "$tmpdir/spire-agent" "$outdir/spire-agent"
mv -f "$tmpdir/spire-server" "$outdir/spire-server"
echo "$inputs_sum" >"$tmpdir/.inputs"
mv -f "$tmpdir/.inputs" "$outdir/.inputs"
echo "spire.sh: built in $((SECONDS - start))s" >&2
echo "$outdir"
