package keys

import (
	"context"
	"fmt"
	"net/url"
	"sort"
	"strings"

	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"
	_ "go.step.sm/crypto/kms/pkcs11" // the "pkcs11" type (needs cgo; a stub that says so without it)
)

// builtInKMS holds the KMS types compiled into meshid-ca: pkcs11 always;
// awskms, cloudkms and azurekms with -tags meshid_cloudkms (kms_cloud.go,
// whose init adds them). It is fixed at build time.
var builtInKMS = map[apiv1.Type]bool{apiv1.PKCS11: true}

// KMSKey is a CA key in a KMS or HSM, opened through go.step.sm/crypto/kms.
type KMSKey struct {
	External
	km kms.KeyManager
}

// Close releases the KMS (the PKCS#11 session).
func (k *KMSKey) Close() error { return k.km.Close() }

// OpenKMSKey opens the key uri names (pkcs11:module-path=…;token=…;id=…;
// object=…?pin-source=…), creating it with alg in the token when it does
// not exist yet. With -tags meshid_cloudkms it also opens an existing key
// in AWS KMS (awskms:…), Google Cloud KMS (cloudkms:…) or Azure Key Vault
// (azurekms:…), which it does not create. The private key never leaves
// the KMS; what meshid records of it (ca-key.uri) is the URI without its
// query, which holds the PIN (or a cloud's client secret).
func OpenKMSKey(ctx context.Context, uri string, alg Algorithm) (*KMSKey, error) {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme == "" || u.Opaque == "" {
		return nil, fmt.Errorf("keys: --ca-key-uri %q is not a KMS URI such as pkcs11:token=meshid;object=meshid-ca?pin-source=/etc/meshid/pin", redact(uri))
	}
	if !builtInKMS[apiv1.Type(u.Scheme)] {
		return nil, fmt.Errorf("keys: --ca-key-uri: KMS type %q is not built into meshid-ca (%s)", u.Scheme, builtInKMSList())
	}
	sig, bits, err := kmsAlgorithm(alg)
	if err != nil {
		return nil, err
	}
	km, err := kms.New(ctx, apiv1.Options{URI: uri})
	if err != nil {
		return nil, fmt.Errorf("keys: opening the KMS of %s: %w", redact(uri), err)
	}
	if _, err := km.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: uri}); err != nil {
		if apiv1.Type(u.Scheme) != apiv1.PKCS11 {
			// A cloud KMS names a new key itself (AWS, Google); a failed
			// look-up there may be a network error, and a key made then
			// would be one nobody names. Such keys are made with the
			// cloud's own tools.
			km.Close()
			return nil, fmt.Errorf("keys: the CA key %s (meshid-ca makes keys only in PKCS#11 tokens; make a cloud KMS key with the cloud's own tools): %w", redact(uri), err)
		}
		if _, err := km.CreateKey(&apiv1.CreateKeyRequest{Name: uri, SignatureAlgorithm: sig, Bits: bits}); err != nil {
			km.Close()
			return nil, fmt.Errorf("keys: creating the CA key %s: %w", redact(uri), err)
		}
	}
	signer, err := km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: uri})
	if err != nil {
		km.Close()
		return nil, fmt.Errorf("keys: the CA key %s: %w", redact(uri), err)
	}
	return &KMSKey{External: External{Signer: signer, URI: redact(uri)}, km: km}, nil
}

// builtInKMSList says which KMS types this meshid-ca has, for errors.
func builtInKMSList() string {
	var ts []string
	for t := range builtInKMS {
		ts = append(ts, string(t))
	}
	sort.Strings(ts)
	if len(ts) == 1 {
		return ts[0] + " is"
	}
	return strings.Join(ts, ", ") + " are"
}

// redact drops a URI's query, where PKCS#11 URIs carry the PIN.
func redact(uri string) string {
	s, _, _ := strings.Cut(uri, "?")
	return s
}

func kmsAlgorithm(alg Algorithm) (apiv1.SignatureAlgorithm, int, error) {
	switch alg {
	case ECDSAP256, "":
		return apiv1.ECDSAWithSHA256, 0, nil
	case ECDSAP384:
		return apiv1.ECDSAWithSHA384, 0, nil
	case RSA2048:
		return apiv1.SHA256WithRSA, 2048, nil
	case RSA3072:
		return apiv1.SHA256WithRSA, 3072, nil
	case RSA4096:
		return apiv1.SHA256WithRSA, 4096, nil
	}
	return 0, 0, fmt.Errorf("keys: no KMS key type for %q", alg)
}
