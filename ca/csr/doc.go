// Package csr checks certificate signing requests at the API edge: one PEM
// request, an allowed key, a valid signature (proof of possession), and no
// name other than the caller's own SPIFFE ID.
//
// Only the public key survives the check. The certificate itself is built
// from the authenticated identity, never from the request, so anything else a
// request carries (subject attributes, extensions) is ignored, not trusted.
package csr
