#!/usr/bin/env bash
# Builds smallstep's real step-ca from the Go module proxy, for interop tests of
# meshid-ca's --ca-source=step, and caches it.
#
# Usage: hack/step-ca.sh [--force]
#
# Prints ONLY the absolute directory holding the result on stdout:
#   <dir>/step-ca   the binary (CGO_ENABLED=0: no PKCS#11/YubiKey KMS in it)
# where <dir> = ${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}/step-ca/<version>.
# The version is the one pinned in hack/step-ca/go.mod. Builds only when the
# binary is missing (cold: about 2 minutes, ~170 MB of module downloads, 1.2 GB
# in the module cache); --force rebuilds. Concurrent runs wait for each other.
# Progress goes to stderr.
set -euo pipefail

force=0
for arg in "$@"; do
	case "$arg" in
	--force) force=1 ;;
	-h | --help)
		sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
		exit 0
		;;
	*)
		echo "step-ca.sh: unknown argument: $arg" >&2
		exit 2
		;;
	esac
done

moddir="$(cd "$(dirname "${BASH_SOURCE[0]}")/step-ca" && pwd)"
version="$(awk '$1 == "github.com/smallstep/certificates" && $2 ~ /^v/ { print $2; exit }' "$moddir/go.mod")"
if [[ -z "$version" ]]; then
	echo "step-ca.sh: no github.com/smallstep/certificates requirement in $moddir/go.mod" >&2
	exit 1
fi

cache_root="${MESHID_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/meshid}"
mkdir -p "$cache_root"
cache_root="$(cd "$cache_root" && pwd)"
outdir="$cache_root/step-ca/$version"

if [[ $force -eq 0 && -x "$outdir/step-ca" ]]; then
	echo "$outdir"
	exit 0
fi

command -v go >/dev/null || {
	echo "step-ca.sh: go is not on PATH" >&2
	exit 1
}

mkdir -p "$outdir"
# Serialise concurrent runs so they do not build twice; the second one finds
# the binary the first one built (unless --force).
exec 9>"$outdir/.lock"
if command -v flock >/dev/null 2>&1; then
	if ! flock -n 9; then
		echo "step-ca.sh: waiting for another step-ca build to finish" >&2
		flock 9
	fi
	if [[ $force -eq 0 && -x "$outdir/step-ca" ]]; then
		echo "$outdir"
		exit 0
	fi
fi

tmpdir="$(mktemp -d "$outdir/.build.XXXXXX")"
trap 'rm -rf "$tmpdir"' EXIT

echo "step-ca.sh: building github.com/smallstep/certificates@$version step-ca into $outdir (about 2 minutes when cold)" >&2
start=$SECONDS
(
	cd "$moddir"
	# GOWORK=off: never let a go.work above this directory take over.
	# -mod=readonly on the command line wins over any -mod in GOFLAGS.
	# CGO_ENABLED=0: as step-ca's own default build; with cgo, its YubiKey
	# KMS would need the pcsc-lite headers.
	export GOWORK=off CGO_ENABLED=0
	go build -mod=readonly -p 2 -trimpath \
		-ldflags="-s -w -X main.Version=${version#v}" \
		-o "$tmpdir/step-ca" github.com/smallstep/certificates/cmd/step-ca
) >&2
# Smoke test before publishing the binary.
if ! "$tmpdir/step-ca" version >/dev/null 2>&1; then
	echo "step-ca.sh: the freshly built step-ca does not run ('step-ca version' failed)" >&2
	exit 1
fi

# The binary's presence marks a complete install.
mv -f "$tmpdir/step-ca" "$outdir/step-ca"
echo "step-ca.sh: built in $((SECONDS - start))s" >&2
echo "$outdir"
