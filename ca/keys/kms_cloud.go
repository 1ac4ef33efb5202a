//go:build meshid_cloudkms

package keys

import (
	"go.step.sm/crypto/kms/apiv1"
	_ "go.step.sm/crypto/kms/awskms"   // the "awskms" type: AWS KMS
	_ "go.step.sm/crypto/kms/azurekms" // the "azurekms" type: Azure Key Vault
	_ "go.step.sm/crypto/kms/cloudkms" // the "cloudkms" type: Google Cloud KMS
)

// The cloud KMSs, built in with -tags meshid_cloudkms. meshid's tests only
// compile them (hack/test.sh vets this build and runs TestCloudKMSBuiltIn);
// no cloud key is used there: there is no cloud access here.
func init() {
	for _, t := range []apiv1.Type{apiv1.AmazonKMS, apiv1.CloudKMS, apiv1.AzureKMS} {
		builtInKMS[t] = true
	}
}
