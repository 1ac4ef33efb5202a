// Package jwtsvid signs JWT-SVIDs for meshid-ca, as the SPIFFE JWT-SVID
// specification has them: ES256, a kid naming the key, the SPIFFE ID as
// sub, one or more audiences, a short exp.
//
// The keys are meshid-ca's own, apart from the X.509 CA's: a [KeySet] of
// P-256 keys that rotates on a schedule. A new key is made and published
// (in the SPIFFE bundle on the bundle endpoint and in the trust bundle
// ConfigMaps the agents read) half a rotation period before it signs, and
// an old one stays published until the last token it signed has expired,
// so that no verifier ever meets a token whose key it has not been given.
// The set is kept in a [Store] that replicas share (a Kubernetes Secret) or
// a file in the state directory; every replica signs with the same key.
package jwtsvid
