package podcert

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"strings"
	"time"

	certsv1beta1 "k8s.io/api/certificates/v1beta1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshid/meshid/ca"
)

// TrustBundle keeps the mesh's roots in the ClusterTrustBundle of the
// signer, where pods mount them with a clusterTrustBundle projection
// (signerName and a label selector, or the name). During a root rotation
// it holds every root trusted, as the ConfigMaps do.
type TrustBundle struct {
	Client     kubernetes.Interface
	SignerName string // default DefaultSignerName
	Roots      func() []*x509.Certificate
	Poll       time.Duration // default 5s
	Log        *slog.Logger
}

// TrustBundleName is the ClusterTrustBundle of signer: a signer-linked
// bundle's name is "<domain>:<path>:<suffix>".
func TrustBundleName(signer string) string {
	return strings.ReplaceAll(signer, "/", ":") + ":roots"
}

// Run keeps the bundle until ctx ends. Where the API server does not serve
// ClusterTrustBundles (certificates.k8s.io/v1beta1 and the
// ClusterTrustBundle feature gate), it says so once and checks again every
// minute.
func (b *TrustBundle) Run(ctx context.Context) error {
	if b.Client == nil || b.Roots == nil {
		return errors.New("podcert: TrustBundle needs Client and Roots")
	}
	signer, poll, log := b.SignerName, b.Poll, b.Log
	if signer == "" {
		signer = DefaultSignerName
	}
	if poll <= 0 {
		poll = 5 * time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	name := TrustBundleName(signer)
	var written []byte
	unserved := false
	for {
		wait := poll
		var pem bytes.Buffer
		for _, r := range b.Roots() {
			pem.Write(ca.EncodePEM(r))
		}
		if pem.Len() > 0 && !bytes.Equal(pem.Bytes(), written) {
			err := errNotServed
			if gv := servedVersion(b.Client, "clustertrustbundles"); gv != "" {
				err = b.write(ctx, newBundleAPI(b.Client, gv), name, signer, pem.String())
			}
			switch {
			case err == nil:
				written = bytes.Clone(pem.Bytes())
				unserved = false
				log.Info("ClusterTrustBundle written", "name", name, "signer", signer, "roots", len(b.Roots()))
			case errors.Is(err, errNotServed) || apierrors.IsNotFound(err) || apierrors.IsMethodNotSupported(err):
				if !unserved {
					log.Info("ClusterTrustBundle not published: the API server serves no ClusterTrustBundles (certificates.k8s.io/v1 or v1beta1 with the ClusterTrustBundle feature gate); the ConfigMaps still carry the roots", "name", name)
				}
				unserved, wait = true, time.Minute
			default:
				log.Warn("writing the ClusterTrustBundle failed; retrying", "name", name, "error", err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

var errNotServed = errors.New("podcert: no ClusterTrustBundles served")

func (b *TrustBundle) write(ctx context.Context, ctbs *bundleAPI, name, signer, pem string) error {
	cur, err := ctbs.get(ctx, name)
	if apierrors.IsNotFound(err) {
		return ctbs.create(ctx, &certsv1beta1.ClusterTrustBundle{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app.kubernetes.io/managed-by": "meshid-ca", "meshid.dev/trust": "roots"}},
			Spec:       certsv1beta1.ClusterTrustBundleSpec{SignerName: signer, TrustBundle: pem},
		})
	}
	if err != nil {
		return err
	}
	if cur.Spec.TrustBundle == pem {
		return nil
	}
	next := cur.DeepCopy()
	next.Spec.TrustBundle = pem
	return ctbs.update(ctx, next)
}
