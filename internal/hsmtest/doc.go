// Package hsmtest gives tests a real PKCS#11 token: a SoftHSM2 token
// initialised in a temporary directory, with the kms URI that
// go.step.sm/crypto/kms (pkcs11 backend, cgo) opens, as meshid-ca's
// --ca-key-uri will.
//
// SoftHSM2 is Debian's softhsm2 package (softhsm2-util and
// /usr/lib/softhsm/libsofthsm2.so). Without it the test is skipped with the
// command that installs it, or fails when MESHID_REQUIRE_HSM=1.
package hsmtest
