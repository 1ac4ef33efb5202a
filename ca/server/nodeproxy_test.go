package server

import (
	"context"
	"crypto/x509"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/k8sauth"
	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/nodeauth"
)

// nodeProxiesFor allows istio-system/ztunnel to have shop/web, tells it to
// wait for shop/slow, and refuses the rest. The rules themselves are
// tested against a real API server in ca/nodeauth and e2e.
type nodeProxiesFor struct{}

func (nodeProxiesFor) Authorize(c k8sauth.Caller, requested string) (nodeauth.Workload, error) {
	if c.Namespace != "istio-system" || c.ServiceAccount != "ztunnel" {
		return nodeauth.Workload{}, &nodeauth.Error{Reason: "not_node_proxy"}
	}
	switch requested {
	case "spiffe://cluster.local/ns/shop/sa/web":
		return nodeauth.Workload{ID: spiffeid.RequireFromString(requested), Namespace: "shop", ServiceAccount: "web"}, nil
	case "spiffe://cluster.local/ns/shop/sa/slow":
		return nodeauth.Workload{}, nodeauth.ErrUnavailable
	}
	return nodeauth.Workload{}, &nodeauth.Error{Reason: "no_workload_on_node"}
}

func TestCreateCertificateNodeProxy(t *testing.T) {
	e := newEnv(t, envOptions{nodeProxies: nodeProxiesFor{}})
	ztunnel := e.token(t, "istio-system", "ztunnel")
	for_ := func(id string) *structpb.Struct {
		return &structpb.Struct{Fields: map[string]*structpb.Value{"ImpersonatedIdentity": structpb.NewStringValue(id)}}
	}
	naming := func(id string) string {
		return csrFor(t, testKey(), func(r *x509.CertificateRequest) { u, _ := url.Parse(id); r.URIs = []*url.URL{u} })
	}
	web := "spiffe://cluster.local/ns/shop/sa/web"

	resp, err := e.call(ztunnel, &pb.IstioCertificateRequest{Csr: naming(web), Metadata: for_(web)})
	if err != nil {
		t.Fatalf("node proxy asking for a workload it may have: %v", err)
	}
	leaf, err := ca.ParseCertificatesPEM([]byte(resp.CertChain[0]))
	if err != nil || len(leaf[0].URIs) != 1 || leaf[0].URIs[0].String() != web {
		t.Fatalf("leaf: %v, %v", leaf, err)
	}
	rec, err := e.ledger.Certificate(context.Background(), leaf[0].SerialNumber.Text(16))
	if err != nil {
		t.Fatal(err)
	}
	if rec.SPIFFEID != web || rec.Namespace != "shop" || rec.ServiceAccount != "web" ||
		rec.RequestedBy != "spiffe://cluster.local/ns/istio-system/sa/ztunnel" || rec.PodName != "ztunnel-0" {
		t.Errorf("ledger record %+v", rec)
	}

	for _, tc := range []struct {
		name, token, csr, id string
		code                 codes.Code
		msg                  string
	}{
		{"CSR naming the node proxy itself", ztunnel, naming("spiffe://cluster.local/ns/istio-system/sa/ztunnel"), web, codes.PermissionDenied, "csr names an identity other than the caller's"},
		{"refused by the node rules", ztunnel, naming("spiffe://cluster.local/ns/shop/sa/api"), "spiffe://cluster.local/ns/shop/sa/api", codes.PermissionDenied, msgImpersonationNo},
		{"pods not listed yet", ztunnel, naming("spiffe://cluster.local/ns/shop/sa/slow"), "spiffe://cluster.local/ns/shop/sa/slow", codes.Unavailable, msgNodeProxyWait},
		{"not a node proxy", e.token(t, "shop", "api"), naming(web), web, codes.PermissionDenied, msgImpersonationNo},
	} {
		before := e.issued()
		_, err := e.call(tc.token, &pb.IstioCertificateRequest{Csr: tc.csr, Metadata: for_(tc.id)})
		if status.Code(err) != tc.code || status.Convert(err).Message() != tc.msg {
			t.Errorf("%s: %v, want %s %q", tc.name, err, tc.code, tc.msg)
		}
		if e.issued() != before {
			t.Errorf("%s: issued", tc.name)
		}
	}

	// Denying the node proxy's own identity stops what it asks for others.
	e.denied.Replace([]ledger.Denial{{SPIFFEID: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", Reason: "test", By: "admin", At: time.Now()}})
	if _, err := e.call(ztunnel, &pb.IstioCertificateRequest{Csr: naming(web), Metadata: for_(web)}); status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != msgDenied {
		t.Errorf("denied node proxy: %v", err)
	}
	e.denied.Replace([]ledger.Denial{{SPIFFEID: web, Reason: "test", By: "admin", At: time.Now()}})
	if _, err := e.call(ztunnel, &pb.IstioCertificateRequest{Csr: naming(web), Metadata: for_(web)}); status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != msgDenied {
		t.Errorf("denied workload through a node proxy: %v", err)
	}
	assertNoSecrets(t, e.logs.String())
}
