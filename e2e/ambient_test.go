package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/kubetest"
	"github.com/meshid/meshid/internal/poll"
)

// ztunnelClient sends CreateCertificate exactly as ztunnel (Istio ambient
// mode's node proxy, Rust) does, from its source (istio/ztunnel
// src/identity/caclient.rs, auth.rs, src/tls/csr.rs): HTTP/2 over TLS
// trusting the mesh root, "authorization: Bearer <its own token>" and
// "clusterid" headers, a PEM CSR with an ECDSA P-256 key signed with
// SHA-256, no subject and one critical URI SAN (the workload's ID),
// validity_duration in seconds (SECRET_TTL, 24h by default), and metadata
// holding only ImpersonatedIdentity, the workload's full SPIFFE ID.
type ztunnelClient struct {
	client  pb.IstioCertificateServiceClient
	token   string
	cluster string // the clusterid header: ztunnel's ISTIO_META_CLUSTER_ID
}

func newZtunnelClient(t *testing.T, addr string, roots []*x509.Certificate, token string) *ztunnelClient {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12,
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &ztunnelClient{client: pb.NewIstioCertificateServiceClient(conn), token: token, cluster: "Kubernetes"}
}

// ztunnelCSR builds a CSR as ztunnel's boring/openssl builds do: no
// subject, the SAN extension critical with one URI.
func ztunnelCSR(t *testing.T, workload string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(workload)}})
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		SignatureAlgorithm: x509.ECDSAWithSHA256,
		ExtraExtensions:    []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// fetch asks for workload's certificate and checks the answer as ztunnel
// does (src/tls/certificate.rs): at least two elements, the leaf first with
// the workload's ID as its first URI SAN, each middle element one
// certificate, the roots last.
func (z *ztunnelClient) fetch(t *testing.T, workload string) (leaf *x509.Certificate, roots []*x509.Certificate, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+z.token, "clusterid", z.cluster)
	resp, err := z.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(ztunnelCSR(t, workload)),
		ValidityDuration: int64((24 * time.Hour).Seconds()),
		Metadata:         &structpb.Struct{Fields: map[string]*structpb.Value{"ImpersonatedIdentity": structpb.NewStringValue(workload)}},
	})
	if err != nil {
		return nil, nil, err
	}
	chain := resp.GetCertChain()
	if len(chain) < 2 {
		t.Fatalf("cert_chain has %d elements; ztunnel needs the leaf and the roots", len(chain))
	}
	var certs []*x509.Certificate
	for i, p := range chain[:len(chain)-1] {
		c, err := ca.ParseCertificatesPEM([]byte(p))
		if err != nil || len(c) != 1 {
			t.Fatalf("cert_chain[%d]: ztunnel reads one certificate per element: %d, %v", i, len(c), err)
		}
		certs = append(certs, c[0])
	}
	roots, err = ca.ParseCertificatesPEM([]byte(chain[len(chain)-1]))
	if err != nil {
		t.Fatalf("roots element: %v", err)
	}
	leaf = certs[0]
	if len(leaf.URIs) == 0 || leaf.URIs[0].String() != workload {
		t.Fatalf("leaf URI SANs %v; ztunnel requires %s first", leaf.URIs, workload)
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("the leaf does not verify to the roots it came with: %v", err)
	}
	return leaf, roots, nil
}

// TestAmbientNodeProxy: meshid-ca (a process, tokens checked against a real
// kube-apiserver) serves ztunnel's requests for the workloads on its node,
// and refuses the rest; the ledger shows for whom and who asked.
func TestAmbientNodeProxy(t *testing.T) {
	cluster := kubetest.Start(t)
	for _, n := range []string{"node-a", "node-b"} {
		cluster.Node(t, n)
	}
	ztunnelA := cluster.Pod(t, "istio-system", "ztunnel-a", "ztunnel", "node-a")
	cluster.Pod(t, "shop", "web-1", "web", "node-a")
	apiPod := cluster.Pod(t, "shop", "api-1", "api", "node-b")
	cluster.ServiceAccount(t, "ops", "admin")

	state := t.TempDir()
	p := startCA(t, "--kubeconfig="+cluster.Kubeconfig, "--ca-source=dir", "--state-dir="+state,
		"--node-proxy-service-accounts=istio-system/ztunnel", "--admin-service-accounts=ops/admin")
	p.WaitReady(t, 60*time.Second)
	rootFile := filepath.Join(state, "ca", keys.RootCertFile)
	roots := readRoots(t, rootFile)

	web := "spiffe://cluster.local/ns/shop/sa/web"
	api := "spiffe://cluster.local/ns/shop/sa/api"
	z := newZtunnelClient(t, p.GRPCAddr, roots, cluster.PodToken(t, ztunnelA, "istio-ca"))
	leaf, got, err := z.fetch(t, web)
	if err != nil {
		t.Fatalf("ztunnel on node-a asking for shop/web, which runs there: %v", err)
	}
	if !got[0].Equal(roots[0]) {
		t.Errorf("roots element is not the CA's root")
	}
	if ttl := leaf.NotAfter.Sub(leaf.NotBefore); ttl > 25*time.Hour {
		t.Errorf("leaf lifetime %s", ttl)
	}

	refused := func(name string, c *ztunnelClient, workload string, want codes.Code) {
		t.Helper()
		_, _, err := c.fetch(t, workload)
		if status.Code(err) != want {
			t.Errorf("%s: %v, want %s", name, err, want)
		}
	}
	refused("workload on another node", z, api, codes.PermissionDenied)
	refused("workload in another trust domain", z, "spiffe://evil.example/ns/shop/sa/web", codes.PermissionDenied)
	refused("caller not a node proxy", newZtunnelClient(t, p.GRPCAddr, roots, cluster.PodToken(t, apiPod, "istio-ca")), api, codes.PermissionDenied)
	refused("node proxy token bound to no pod", newZtunnelClient(t, p.GRPCAddr, roots, cluster.Token(t, "istio-system", "ztunnel", "istio-ca")), web, codes.PermissionDenied)

	// The ledger: the certificate is shop/web's, asked for by ztunnel from
	// its pod.
	tokFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokFile, []byte(cluster.Token(t, "ops", "admin", "istio-ca")), 0o600); err != nil {
		t.Fatal(err)
	}
	ctl := &ctl{t: t, p: p, caFile: rootFile, tokFile: tokFile}
	rows := ctl.certs("--serial=" + fmt.Sprintf("%x", leaf.SerialNumber))
	if len(rows) != 1 {
		t.Fatalf("ledger rows for the serial: %v", rows)
	}
	r := rows[0]
	if r["spiffe_id"] != web || r["namespace"] != "shop" || r["service_account"] != "web" ||
		r["requested_by"] != "spiffe://cluster.local/ns/istio-system/sa/ztunnel" ||
		r["pod_name"] != "ztunnel-a" || r["pod_uid"] != string(ztunnelA.UID) {
		t.Errorf("ledger record %v", r)
	}
	out, errOut, code := ctl.run("certs", "--spiffe-id="+web)
	if code != 0 || !strings.Contains(out, "REQUESTED BY") || !strings.Contains(out, "istio-system/ztunnel-a") {
		t.Errorf("meshidctl certs: exit %d\n%s%s", code, out, errOut)
	}

	// The workload leaves the node: refused from then on (the pod watch
	// sees the delete shortly after the API server does).
	cluster.DeletePod(t, "shop", "web-1")
	poll.Until(t, "shop/web refused once its only pod on node-a is deleted", func() bool {
		_, _, err := z.fetch(t, web)
		return status.Code(err) == codes.PermissionDenied
	})
	m := p.Metrics(t)
	for _, series := range []string{
		`meshid_ca_node_proxy_requests_total{result="allowed"}`,
		`meshid_ca_node_proxy_requests_total{result="no_workload_on_node"}`,
		`meshid_ca_node_proxy_requests_total{result="not_node_proxy"}`,
		`meshid_ca_node_proxy_requests_total{result="token_not_pod_bound"}`,
		`meshid_ca_node_proxy_requests_total{result="other_trust_domain"}`,
	} {
		if !strings.Contains(m, series) {
			t.Errorf("metrics lack %s", series)
		}
	}
}
