// Package workloadapi serves the SPIFFE Workload API (X.509 part) over the
// agent's certificates, so go-spiffe's workloadapi.X509Source and any other
// SPIFFE-aware client can use meshid unchanged.
package workloadapi
