// Package stepca gets meshid-ca's signing intermediate from smallstep's
// step-ca, so that meshid's mesh sits under an organisation's existing PKI
// instead of a root of its own.
//
// It speaks step-ca's HTTP API directly: the JWK provisioner's encrypted key
// from /1.0/provisioners, decrypted with its password; a one-time token
// signed with it; /1.0/sign. smallstep's own client package
// (github.com/smallstep/certificates/ca) imports step-ca's whole server and
// needs go.step.sm/crypto on go-jose v3, which the HSM support's newer
// go.step.sm/crypto cannot share (docs/step-ca-notes.md); the tests run this
// client against the real step-ca on every run.
package stepca
