#!/usr/bin/env bash
# Makes a local PostgreSQL available for the ledger tests and prints its DSN,
# for a role allowed to CREATE DATABASE:
#
#   MESHID_TEST_POSTGRES_DSN=$(hack/postgres.sh) go test ./ca/ledger
#
# On a Debian/Ubuntu machine it installs the postgresql package if the server
# is missing (as root, or through sudo), starts the first cluster that
# pg_lsclusters lists (creating one if there is none), waits until it accepts
# connections, and creates (or resets) the role meshid/meshid with LOGIN
# CREATEDB. Safe to run again and again: every step is skipped or repeated
# harmlessly when already done.
#
# Progress goes to stderr; stdout carries only the DSN:
#   postgres://meshid:meshid@127.0.0.1:<port>/postgres?sslmode=disable
#
# When it starts a cluster that was not running and MESHID_POSTGRES_STARTED
# names a file, it writes "<version> <cluster>" there, so the caller can stop
# what it started (hack/test.sh does); a cluster that was already running is
# left alone. The package, once installed, stays.
set -euo pipefail

role=meshid
password=meshid

log() { echo "postgres: $*" >&2; }
die() {
	log "$*"
	exit 1
}

# as_root runs a command with root privileges: directly when we are root,
# else through non-interactive sudo.
as_root() {
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		sudo -n "$@"
	else
		die "need root or password-less sudo to run: $*"
	fi
}

# as_postgres runs a command as the postgres OS user, from / so that psql does
# not complain about a working directory it cannot read.
as_postgres() {
	(cd / && as_root runuser -u postgres -- "$@")
}

if ! command -v psql >/dev/null || ! command -v pg_lsclusters >/dev/null || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
	command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get; install it and rerun"
	log "installing PostgreSQL (apt-get install postgresql)"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
fi

# pg_lsclusters -h: no header; fields are version, name, port, status, ...
cluster=$(pg_lsclusters -h | head -n 1)
if [[ -z $cluster ]]; then
	version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
	[[ -n $version ]] || die "no PostgreSQL server version under /usr/lib/postgresql"
	log "no cluster: creating $version/main"
	as_root pg_createcluster "$version" main >&2
	cluster=$(pg_lsclusters -h | head -n 1)
fi
read -r version name port status _ <<<"$cluster"

if [[ $status != online* ]]; then
	log "starting cluster $version/$name (port $port, was $status)"
	as_root pg_ctlcluster "$version" "$name" start >&2
	if [[ -n ${MESHID_POSTGRES_STARTED:-} ]]; then
		echo "$version $name" >"$MESHID_POSTGRES_STARTED"
	fi
fi

for ((i = 0; ; i++)); do
	if pg_isready -q -h 127.0.0.1 -p "$port"; then
		break
	fi
	((i < 60)) || die "cluster $version/$name on port $port not ready after 30s; see its log (pg_lsclusters)"
	sleep 0.5
done
log "cluster $version/$name is ready on 127.0.0.1:$port"

# Create the role, or bring an existing one back to the password and rights
# the tests expect.
as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" -d postgres >&2 <<SQL
DO \$\$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') THEN
		CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password';
	ELSE
		ALTER ROLE $role LOGIN CREATEDB PASSWORD '$password';
	END IF;
END
\$\$;
SQL

dsn="postgres://$role:$password@127.0.0.1:$port/postgres?sslmode=disable"
PGCONNECT_TIMEOUT=10 psql -X -q -At "$dsn" -c 'SELECT 1' >/dev/null ||
	die "role $role cannot log in over TCP; check pg_hba.conf of $version/$name"
echo "$dsn"
