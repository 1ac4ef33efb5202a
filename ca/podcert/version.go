package podcert

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"

	certsv1 "k8s.io/api/certificates/v1"
	certsv1beta1 "k8s.io/api/certificates/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// The API versions of Pod Certificates: v1 from Kubernetes 1.37 (GA), and
// v1beta1 in 1.35 and 1.36 (deprecated in 1.37, gone in 1.40). The signer
// takes the newest the API server serves. The two have the same fields
// but for v1beta1's deprecated pkixPublicKey and proofOfPossession, so
// the signer works on v1beta1's types and converts v1 objects through
// their JSON, which is the same.
const (
	apiV1      = "certificates.k8s.io/v1"
	apiV1beta1 = "certificates.k8s.io/v1beta1"
)

// servedVersion is the newest group version serving resource, or "".
func servedVersion(kube kubernetes.Interface, resource string) string {
	for _, gv := range []string{apiV1, apiV1beta1} {
		rl, err := kube.Discovery().ServerResourcesForGroupVersion(gv)
		if err == nil && slices.ContainsFunc(rl.APIResources, func(r metav1.APIResource) bool { return r.Name == resource }) {
			return gv
		}
	}
	return ""
}

// convert copies in into out through JSON: between the versions' types.
func convert(in, out any) error {
	data, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("podcert: %w", err)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("podcert: %w", err)
	}
	return nil
}

// requestAPI is one version's PodCertificateRequests, as v1beta1 objects.
type requestAPI struct {
	informer cache.SharedIndexInformer
	get      func(ns, name string) (*certsv1beta1.PodCertificateRequest, error)
	status   func(ctx context.Context, pcr *certsv1beta1.PodCertificateRequest) error
}

func newRequestAPI(kube kubernetes.Interface, factory informers.SharedInformerFactory, gv string) *requestAPI {
	if gv == apiV1 {
		inf := factory.Certificates().V1().PodCertificateRequests()
		return &requestAPI{
			informer: inf.Informer(),
			get: func(ns, name string) (*certsv1beta1.PodCertificateRequest, error) {
				o, err := inf.Lister().PodCertificateRequests(ns).Get(name)
				if err != nil {
					return nil, err
				}
				var out certsv1beta1.PodCertificateRequest
				return &out, convert(o, &out)
			},
			status: func(ctx context.Context, pcr *certsv1beta1.PodCertificateRequest) error {
				var o certsv1.PodCertificateRequest
				if err := convert(pcr, &o); err != nil {
					return err
				}
				_, err := kube.CertificatesV1().PodCertificateRequests(o.Namespace).UpdateStatus(ctx, &o, metav1.UpdateOptions{})
				return err
			},
		}
	}
	inf := factory.Certificates().V1beta1().PodCertificateRequests()
	return &requestAPI{
		informer: inf.Informer(),
		get: func(ns, name string) (*certsv1beta1.PodCertificateRequest, error) {
			return inf.Lister().PodCertificateRequests(ns).Get(name)
		},
		status: func(ctx context.Context, pcr *certsv1beta1.PodCertificateRequest) error {
			_, err := kube.CertificatesV1beta1().PodCertificateRequests(pcr.Namespace).UpdateStatus(ctx, pcr, metav1.UpdateOptions{})
			return err
		},
	}
}

// asV1beta1 is an informer's object as a v1beta1 request, or nil.
func asV1beta1(obj any) *certsv1beta1.PodCertificateRequest {
	switch o := obj.(type) {
	case *certsv1beta1.PodCertificateRequest:
		return o
	case *certsv1.PodCertificateRequest:
		var out certsv1beta1.PodCertificateRequest
		if convert(o, &out) == nil {
			return &out
		}
	}
	return nil
}

// bundleAPI is one version's ClusterTrustBundles, as v1beta1 objects.
type bundleAPI struct {
	get    func(ctx context.Context, name string) (*certsv1beta1.ClusterTrustBundle, error)
	create func(ctx context.Context, b *certsv1beta1.ClusterTrustBundle) error
	update func(ctx context.Context, b *certsv1beta1.ClusterTrustBundle) error
}

func newBundleAPI(kube kubernetes.Interface, gv string) *bundleAPI {
	if gv == apiV1 {
		c := kube.CertificatesV1().ClusterTrustBundles()
		to := func(b *certsv1beta1.ClusterTrustBundle) (*certsv1.ClusterTrustBundle, error) {
			var o certsv1.ClusterTrustBundle
			return &o, convert(b, &o)
		}
		return &bundleAPI{
			get: func(ctx context.Context, name string) (*certsv1beta1.ClusterTrustBundle, error) {
				o, err := c.Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					return nil, err
				}
				var out certsv1beta1.ClusterTrustBundle
				return &out, convert(o, &out)
			},
			create: func(ctx context.Context, b *certsv1beta1.ClusterTrustBundle) error {
				o, err := to(b)
				if err == nil {
					_, err = c.Create(ctx, o, metav1.CreateOptions{})
				}
				return err
			},
			update: func(ctx context.Context, b *certsv1beta1.ClusterTrustBundle) error {
				o, err := to(b)
				if err == nil {
					_, err = c.Update(ctx, o, metav1.UpdateOptions{})
				}
				return err
			},
		}
	}
	c := kube.CertificatesV1beta1().ClusterTrustBundles()
	return &bundleAPI{
		get: func(ctx context.Context, name string) (*certsv1beta1.ClusterTrustBundle, error) {
			return c.Get(ctx, name, metav1.GetOptions{})
		},
		create: func(ctx context.Context, b *certsv1beta1.ClusterTrustBundle) error {
			_, err := c.Create(ctx, b, metav1.CreateOptions{})
			return err
		},
		update: func(ctx context.Context, b *certsv1beta1.ClusterTrustBundle) error {
			_, err := c.Update(ctx, b, metav1.UpdateOptions{})
			return err
		},
	}
}
