#!/usr/bin/env bash
# Builds meshid's container images from this checkout, with no Docker daemon
# and no registry, as image archives in dist/images (go run ./hack/images):
#
#   hack/images.sh                      # meshid-ca, meshid-agent, meshidctl
#   hack/images.sh -o DIR meshid-ca     # one image, elsewhere
#   hack/images.sh -arch arm64          # for another architecture
#
# Each archive (dist/images/<name>.tar) holds localhost/meshid/<name>:<the
# chart's appVersion>, the chart's default image, and loads with
# `docker load -i`, `ctr -n k8s.io images import` or `kind load
# image-archive`. Binaries are static (CGO_ENABLED=0) on an empty base;
# meshid-ca runs as 65532:65532. The same commit gives the same digests; the
# lines printed are "<archive> <image> <digest>". About 2 minutes with an
# empty build cache on 2 cores, seconds after.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./hack/images "$@"
