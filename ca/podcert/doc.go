// Package podcert makes meshid-ca a signer of Kubernetes Pod Certificates
// (KEP-4317, certificates.k8s.io/v1beta1 from Kubernetes 1.35): the kubelet
// makes a pod's key and files a PodCertificateRequest naming meshid's
// signer; the [Signer] checks it against the live pod, service account and
// node and the key's proof of possession, has the same SPIFFE certificate
// issued as CreateCertificate would (deny list, rate limits, TTL clamp,
// ledger), and sets the request Issued, or Denied or Failed with a reason.
// [TrustBundle] publishes the mesh's roots as the signer's
// ClusterTrustBundle.
package podcert
