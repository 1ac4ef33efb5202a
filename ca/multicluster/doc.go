// Package multicluster lets meshid-ca serve a mesh that spans clusters: a
// caller's token is checked against the API server of the cluster it names
// (Istio's clusterid header), never another.
//
// [Remotes] reads the other clusters' kubeconfigs from Secrets, as
// istiod's remote secrets (`istioctl create-remote-secret`) hold them:
// each data key a cluster ID, each value a kubeconfig. Secrets are watched,
// so clusters are picked up and dropped while meshid-ca runs. Kubeconfigs
// that would run a command or read a file (exec, auth-provider, file
// references) are refused: a Secret must not make the CA run code.
//
// [Router] sends each token to its cluster's authenticator and records in
// the [k8sauth.Caller] which cluster verified it; a cluster it does not know
// is refused.
package multicluster
