// Package peers takes other trust domains' bundles: meshid-ca is told
// which trust domains it federates with (ParseConfig: the shape of SPIRE's
// ClusterFederatedTrustDomain), fetches each peer's bundle from its SPIFFE
// bundle endpoint (https_web or https_spiffe), refreshes it as the peer's
// refresh hint says, refuses a bundle older than the one it holds (sequence
// numbers) and keeps the last good one in a Store across restarts and
// replicas. A peer's bundle is only ever for the peer's trust domain: one
// naming meshid's own is refused at every step.
package peers
