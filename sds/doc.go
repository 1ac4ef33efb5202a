// Package sds serves workload certificates and the trust bundle to Envoy
// over its Secret Discovery Service (v3), on a Unix socket: "default" is the
// workload's certificate and key, "ROOTCA" the trusted roots. Secrets are
// pushed on open streams as soon as they change.
package sds
