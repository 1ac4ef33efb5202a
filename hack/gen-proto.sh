#!/usr/bin/env bash
# Regenerates the Go code of meshid's own gRPC APIs (ca/admin/adminpb,
# ca/jwtsvid/jwtsvidpb) from their .proto files. The generated files are committed; this is needed only after
# editing the .proto. Needs protoc (Debian: protobuf-compiler); the Go
# plugins are installed from the module proxy at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "gen-proto: protoc missing: apt-get install protobuf-compiler" >&2; exit 1; }
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
GOBIN=$bin go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.10
GOBIN=$bin go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.0
PATH=$bin:$PATH protoc -I . -I /usr/include \
	--go_out=. --go_opt=paths=source_relative \
	--go-grpc_out=. --go-grpc_opt=paths=source_relative \
	ca/admin/adminpb/admin.proto ca/jwtsvid/jwtsvidpb/jwtsvid.proto
