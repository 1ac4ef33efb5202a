#!/usr/bin/env bash
# Builds meshid and runs the local demo: meshid-ca on its embedded default (a
# state directory, tokens checked offline against a local issuer's JWKS, no
# cluster), a certificate issued and verified, and requests refused.
# Arguments go to meshid-demo (--dir, --grpc-addr, --http-addr).
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/ ./cmd/...
exec bin/meshid-demo "$@"
