//go:build !meshid_cloudkms

package keys_test

import (
	"context"
	"strings"
	"testing"

	"github.com/meshid/meshid/ca/keys"
)

// TestCloudKMSNotBuiltIn: the default build has only pkcs11 and says so for
// a cloud KMS URI (-tags meshid_cloudkms builds them in).
func TestCloudKMSNotBuiltIn(t *testing.T) {
	for _, uri := range []string{
		"awskms:key-id=0f3b9c3e-1111-4222-8333-444455556666;region=eu-west-1",
		"cloudkms:projects/meshid/locations/global/keyRings/meshid/cryptoKeys/meshid-ca/cryptoKeyVersions/1",
		"azurekms:vault=meshid;name=meshid-ca",
	} {
		_, err := keys.OpenKMSKey(context.Background(), uri, keys.ECDSAP256)
		if err == nil || !strings.Contains(err.Error(), "is not built into meshid-ca (pkcs11 is)") {
			t.Errorf("OpenKMSKey(%s) = %v, want it not built in", uri, err)
		}
	}
}
