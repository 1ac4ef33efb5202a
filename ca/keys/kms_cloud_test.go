//go:build meshid_cloudkms

package keys_test

import (
	"context"
	"strings"
	"testing"

	"github.com/meshid/meshid/ca/keys"
)

// TestCloudKMSBuiltIn: with -tags meshid_cloudkms, awskms, cloudkms and
// azurekms URIs get past OpenKMSKey's check of the built-in KMS types and
// reach the backend, which here fails on its own (a missing credentials
// file, an unknown cloud) before any network access. No cloud key is used:
// there is no cloud access here.
func TestCloudKMSBuiltIn(t *testing.T) {
	for _, c := range []struct{ uri, backendErr string }{
		{"awskms:key-id=0f3b9c3e-1111-4222-8333-444455556666;region=eu-west-1;profile=meshid-test;credentials-file=/nonexistent/aws-config",
			"error loading AWS config"},
		{"cloudkms:resource=projects/meshid/locations/global/keyRings/meshid/cryptoKeys/meshid-ca/cryptoKeyVersions/1;credentials-file=/nonexistent/gcp.json",
			"/nonexistent/gcp.json"},
		{"azurekms:vault=meshid;name=meshid-ca;environment=nowhere",
			`unknown key vault cloud environment with name "nowhere"`},
	} {
		_, err := keys.OpenKMSKey(context.Background(), c.uri, keys.ECDSAP256)
		if err == nil {
			t.Errorf("OpenKMSKey(%s): no error", c.uri)
			continue
		}
		if strings.Contains(err.Error(), "not built into meshid-ca") || !strings.Contains(err.Error(), c.backendErr) {
			t.Errorf("OpenKMSKey(%s) = %v, want the backend's error %q", c.uri, err, c.backendErr)
		}
	}
}
