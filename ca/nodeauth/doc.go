// Package nodeauth decides whether a node proxy may ask for the certificate
// of another identity: Istio ambient mode's ztunnel runs one per node and
// asks, with its own service-account token, for the certificate of each
// workload on its node, naming it in the request's ImpersonatedIdentity.
//
// [Authorizer] allows it as istiod does (security/pkg/server/ca/node_auth.go
// in istio.io/istio), and somewhat more strictly:
//
//  1. the caller's service account is one of the configured node proxies;
//  2. its token is bound to a pod, and that pod exists with the token's
//     UID, the caller's service account, and a node;
//  3. the requested identity is spiffe://<trust domain>/ns/<ns>/sa/<sa> in
//     this CA's trust domain (istiod does not check the trust domain);
//  4. a pod of that namespace and service account is on the caller's node
//     and has not ended (Failed or Succeeded; istiod counts those too).
//
// Pods are watched, trimmed to the fields above, and indexed by node and
// service account: no API call per request.
package nodeauth
