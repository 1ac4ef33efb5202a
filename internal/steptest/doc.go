// Package steptest runs a real smallstep step-ca for tests of meshid-ca's
// --ca-source=step: the binary that hack/step-ca.sh builds from the Go module
// proxy, on a loopback port, with a PKI made at test time.
//
// Nothing of step's own tooling is used: NewPKI makes the root, step-ca's
// intermediate and a JWK provisioner (its private key encrypted with a
// password, as `step ca provisioner add` stores it) in Go, and Start writes
// the few files step-ca reads (ca.json, the two certificates and the
// intermediate key) into a temporary directory.
//
// The provisioner carries an X.509 template (IntermediateTemplate) that makes
// every certificate it signs a path-length-0 CA whose critical name
// constraint permits only URIs in the trust domain: the shape of meshid-ca's
// intermediate. step-ca's own intermediate gets maxPathLen 1 and the root 2,
// so that root → step intermediate → meshid intermediate → workload is a
// valid path; a PKI made by `step ca init` (root 1, intermediate 0) cannot
// carry a meshid intermediate, and Options.StepInitPathLens makes one to
// show it.
//
// Without the binary, Start skips the test with the command that builds it,
// or fails it when MESHID_REQUIRE_STEP=1 (hack/test.sh sets that).
package steptest
