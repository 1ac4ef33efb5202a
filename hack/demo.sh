#!/usr/bin/env bash
# Builds meshid and runs the local demo: meshid-ca on its embedded default (a
# state directory, tokens checked offline against a local issuer's JWKS, no
# cluster), then meshid-agent and two workloads talking mTLS through
# rotations. Arguments go to meshid-demo (--dir, --grpc-addr, --http-addr,
# --cert-ttl, --duration).
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/ ./cmd/...
exec bin/meshid-demo "$@"
