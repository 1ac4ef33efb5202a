//go:build cgo

package keys_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/hsmtest"
)

// BenchmarkCAKeySign: one signature of the kind issuance makes, with the
// key in memory and in a SoftHSM2 token (PKCS#11 through kms), on all
// cores at once as meshid-ca signs.
func BenchmarkCAKeySign(b *testing.B) {
	digest := sha256.Sum256([]byte("tbsCertificate"))
	run := func(b *testing.B, s crypto.Signer) {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("memory", func(b *testing.B) {
		k, err := keys.GenerateKey(keys.ECDSAP256)
		if err != nil {
			b.Fatal(err)
		}
		run(b, k)
	})
	b.Run("softhsm2", func(b *testing.B) {
		tok := hsmtest.SoftHSM(b, "bench")
		k, err := keys.OpenKMSKey(b.Context(), "pkcs11:module-path="+tok.Module+";token=bench;id=01;object=bench?pin-value="+tok.PIN, keys.ECDSAP256)
		if err != nil {
			b.Fatal(err)
		}
		defer k.Close()
		run(b, k.Signer)
	})
}
