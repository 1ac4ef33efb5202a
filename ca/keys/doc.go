// Package keys loads, creates and persists the CA's keys and certificates,
// and keeps the current [ca.Issuer] for the signing path.
//
// Three sources are supported. A state directory (the embedded default) and a
// Kubernetes Secret both hold a self-signed root and a signing intermediate
// that meshid creates on first start and reuses ever after. A plug-in
// directory in Istio's cacerts layout holds a CA managed elsewhere; it is
// watched and reloaded when its files change. Files use Istio's names in all
// three: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem, plus
// root-key.pem where meshid owns the root.
package keys
