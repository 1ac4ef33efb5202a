// Package server exposes the CA over gRPC as Istio's certificate service
// (istio.v1.auth.IstioCertificateService/CreateCertificate), with health and
// Prometheus metrics over HTTP.
//
// A request goes authenticate → rate limit → check the CSR → sign → log, and
// every failure leaves as a short, stable message with the gRPC code a client
// can act on; the detail goes to the log, never a token, key or CSR.
package server
