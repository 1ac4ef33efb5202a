#!/usr/bin/env bash
# Builds what the demo runs (meshid-ca, meshid-agent, meshidctl, meshid-demo)
# and runs it: meshid-ca on its embedded default (a state directory, tokens
# checked offline against a local issuer's JWKS, no cluster), then
# meshid-agent and two workloads talking mTLS through rotations. Arguments go
# to meshid-demo (--dir, --grpc-addr, --http-addr, --cert-ttl, --duration,
# --stay).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'demo: %s\n' "$*"; }
start=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

# Go modules: nothing to do once downloaded; the first time, a few hundred MB.
if [[ -z $(go list -m -f '{{.Dir}}' k8s.io/client-go 2>/dev/null) ]]; then
	log "downloading the Go modules meshid needs (first run only; a few hundred MB)…"
	go mod download
	log "modules downloaded ($(elapsed))"
fi

# A cold build compiles about 900 packages (client-go, gRPC, SQLite among
# them): 2m11s measured on 2 cores with an empty module cache and build
# cache. go build -v names each package it
# compiles; a warm build compiles none and says nothing.
log "building meshid-ca, meshid-agent, meshidctl and meshid-demo into bin/ (first build: about 2–3 minutes on 2 cores; then seconds)…"
n=0
go build -v -o bin/ ./cmd/meshid-ca ./cmd/meshid-agent ./cmd/meshidctl ./cmd/meshid-demo 2>&1 |
	while IFS= read -r line; do
		case $line in
		'#'* | *.go:[0-9]* | 'go: '*) printf '%s\n' "$line" >&2 ;; # compiler and go command errors
		*)
			n=$((n + 1))
			if ((n % 100 == 0)); then log "  $n packages compiled ($(elapsed))"; fi
			;;
		esac
	done
log "built ($(elapsed))"
exec bin/meshid-demo "$@"
