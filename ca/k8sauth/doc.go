// Package k8sauth authenticates callers by their Kubernetes service-account
// tokens and returns a typed [Caller].
//
// Two authenticators share one result type: [TokenReview] asks the API
// server (the default in a cluster; it notices deleted service accounts and
// pods), and [JWKS] verifies projected tokens offline against the cluster
// issuer's public keys (for a CA outside the cluster, and for the local
// demo). [Cache] sits in front of either so that renewal storms do not
// hammer the API server; it keys entries by a hash of the token, never the
// token itself.
//
// Both enforce the same rules: the token must be meant for one of our
// audiences, and must name a service account as
// system:serviceaccount:<namespace>:<name>, parsed strictly.
package k8sauth
