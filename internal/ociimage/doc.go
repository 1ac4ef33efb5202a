// Package ociimage builds container images from files with no Docker daemon
// and no registry, and writes them as image archives that `docker load`,
// `ctr images import` and `kind load image-archive` all read.
//
// An image is one layer on an empty base. Everything that goes into it is
// data (the files, the entrypoint, the labels, the creation time), so the same
// inputs give the same digest: file times are the image's creation time,
// owners are root, entries are sorted, and gzip has no name or time.
//
// The archive is the layout `docker save` writes since Docker 25: an OCI image
// layout (oci-layout, index.json, blobs/sha256/…) that containerd imports with
// the manifest digest this package computed, plus Docker's manifest.json for
// older Docker engines.
package ociimage
