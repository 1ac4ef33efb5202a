#!/usr/bin/env bash
# Installs the Debian packages of hack/deps.txt that are missing (as root,
# or through password-less sudo), so that a fresh Debian machine runs
# hack/test.sh and hack/cluster.sh. With --check it only names the missing
# ones and fails if there are any.
#
#   hack/deps.sh            # install what is missing (apt-get)
#   hack/deps.sh --check    # exit 1 naming what is missing
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
case "${1:-}" in
--check) check=1 ;;
"") ;;
*)
	echo "deps.sh: unknown argument '$1' (usage: hack/deps.sh [--check])" >&2
	exit 2
	;;
esac

mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]*$//' hack/deps.txt)
missing=()
for p in "${packages[@]}"; do
	if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
		missing+=("$p")
	fi
done
if ((${#missing[@]} == 0)); then
	exit 0
fi
if ((check)); then
	echo "deps.sh: missing Debian packages: ${missing[*]} (hack/deps.sh installs them)" >&2
	exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
	if ! sudo -n true 2>/dev/null; then
		echo "deps.sh: missing Debian packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
		exit 1
	fi
	sudo=(sudo -n)
fi
command -v apt-get >/dev/null || {
	echo "deps.sh: no apt-get; install these packages: ${missing[*]}" >&2
	exit 1
}
echo "deps.sh: installing ${missing[*]}" >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
# Debian starts some services on install (containerd, postgresql's default
# cluster): the tests start their own.
echo "deps.sh: installed ${missing[*]}" >&2
