// Package faults breaks the world around meshid on purpose while it serves
// and checks after each fault that no promise was broken.
//
// The world: a real kube-apiserver behind a fault front (down, slow, 429 and
// 5xx bursts), two meshid-ca replicas on one PostgreSQL through a
// toxiproxy link (partitions, resets) behind a balancer, meshid-agent in
// node mode reaching the CA through another link, and simulated workloads
// on the agent's socket: Envoy-like SDS streams and go-spiffe Workload API
// clients, each its own service account. A probe asks the CA directly every
// 250 ms with a valid token and with a junk one.
//
// The invariants, checked after each fault: no workload holds an expired
// certificate (every fault lasts less than half a lifetime); nothing is
// issued to a junk token or to a token the CA cannot check (fail closed);
// every refusal carries a clear gRPC code and message; every certificate a
// client received is in the ledger; every certificate names its holder's
// identity; issuance recovers within half a lifetime.
//
// TestFaults is the short suite (about 3 minutes, in hack/test.sh);
// hack/faults.sh runs it and, with --soak, the compressed soak.
package faults
