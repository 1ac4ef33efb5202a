// Package distribute keeps the trust bundle where workloads read it: a
// ConfigMap (Istio's istio-ca-root-cert, key root-cert.pem) in every
// namespace, holding every root currently trusted. It creates the
// ConfigMap in new namespaces, repairs it when edited or deleted, and
// rewrites it when the roots change. Only one replica should run it at a
// time (see Leader); issuance does not depend on it.
package distribute
