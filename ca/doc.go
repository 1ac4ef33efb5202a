// Package ca turns an authenticated identity and a public key into a signed
// SPIFFE X.509 certificate.
//
// The path has three steps, each small enough to audit: build the leaf
// template from the identity alone (never from the CSR), sign it with the
// current [Issuer], then re-validate what was signed before it is returned.
// The package knows nothing of gRPC, Kubernetes or CSRs: parsing requests and
// proving possession of the key happen at the API edge (see package csr), and
// key storage lives in package keys.
package ca
