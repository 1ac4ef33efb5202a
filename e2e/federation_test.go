package e2e

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestFederation: meshid-ca of cluster.local federates with another
// meshid-ca, of other.example, through the other's real SPIFFE bundle
// endpoint (https_spiffe, its endpoint SVID verified against the bootstrap
// bundle), and keeps its bundle fresh; a federation file naming its own
// trust domain is refused at start.
func TestFederation(t *testing.T) {
	dir := t.TempDir()
	otherState := filepath.Join(dir, "other")
	_, otherArgs := jwksCAArgs(t, dir, otherState)
	other := startCA(t, append(otherArgs, "--trust-domain=other.example")...)
	other.WaitReady(t, 30*time.Second)
	endpoint, _ := other.LogRecords("meshid-ca serving")[0]["bundle_endpoint_addr"].(string)
	if endpoint == "" {
		t.Fatal("the other CA serves no bundle endpoint")
	}
	otherTD := spiffeid.RequireTrustDomainFromString("other.example")
	bootstrap, err := spiffebundle.FromX509Authorities(otherTD, readRoots(t, filepath.Join(otherState, "ca", "root-cert.pem"))).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "federation.yaml")
	mustWrite(t, config, []byte(fmt.Sprintf(`federatesWith:
- trustDomain: other.example
  bundleEndpointURL: https://%s
  bundleEndpointProfile:
    type: https_spiffe
    endpointSPIFFEID: spiffe://other.example/ns/meshid-system/sa/meshid-ca
  trustDomainBundle: '%s'
`, endpoint, bootstrap)), 0o644)

	_, args := jwksCAArgs(t, dir, filepath.Join(dir, "mesh"))
	mesh := startCA(t, append(args, "--federation-file="+config)...)
	mesh.WaitReady(t, 30*time.Second)
	waitUntil(t, 30*time.Second, "other.example's bundle fetched", func() bool {
		m := mesh.Metrics(t)
		return strings.Contains(m, `meshid_ca_federated_bundle_stale{trust_domain="other.example"} 0`) &&
			strings.Contains(m, `meshid_ca_federated_bundle_fetches_total{result="ok",trust_domain="other.example"} 1`)
	})
	if recs := mesh.LogRecords("federated bundle updated"); len(recs) == 0 || recs[len(recs)-1]["from"] != "endpoint" {
		t.Errorf("no update from the endpoint logged: %v", recs)
	}

	// Its own trust domain as a peer: refused before anything starts.
	mustWrite(t, config, []byte("federatesWith:\n- trustDomain: cluster.local\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https_web}\n"), 0o644)
	cmd := exec.Command(binary("meshid-ca", "MESHID_E2E_CA_BIN"), append(args, "--federation-file="+config, "--grpc-addr=127.0.0.1:0", "--http-addr=127.0.0.1:0")...)
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "own trust domain") {
		t.Errorf("meshid-ca federating with its own trust domain: %v\n%s", err, out)
	}
}
