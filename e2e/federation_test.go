package e2e

import (
	"encoding/json"
	"fmt"
	"os"
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

	issuer, args := jwksCAArgs(t, dir, filepath.Join(dir, "mesh"))
	mesh := startCA(t, append(append(args, "--federation-file="+config), adminArgs...)...)
	mesh.WaitReady(t, 30*time.Second)
	waitUntil(t, 30*time.Second, "other.example's bundle fetched", func() bool {
		m := mesh.Metrics(t)
		return strings.Contains(m, `meshid_ca_federated_bundle_stale{trust_domain="other.example"} 0`) &&
			strings.Contains(m, `meshid_ca_federated_bundle_fetches_total{result="ok",trust_domain="other.example"} 1`)
	})
	if recs := mesh.LogRecords("federated bundle updated"); len(recs) == 0 || recs[len(recs)-1]["from"] != "endpoint" {
		t.Errorf("no update from the endpoint logged: %v", recs)
	}

	// meshidctl lists and shows it, and its health check reports it.
	ctl := newCtl(t, mesh, issuer, filepath.Join(dir, "mesh", "ca", "root-cert.pem"))
	out, errOut, code := ctl.run("bundle", "list", "-o", "json")
	var rows []struct {
		TrustDomain     string     `json:"trustDomain"`
		Source          string     `json:"source"`
		X509Authorities int        `json:"x509Authorities"`
		JWTAuthorities  int        `json:"jwtAuthorities"`
		FetchedAt       *time.Time `json:"fetchedAt"`
		Stale           bool       `json:"stale"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil || code != 0 {
		t.Fatalf("meshidctl bundle list: exit %d, %v\n%s%s", code, err, out, errOut)
	}
	if len(rows) != 1 || rows[0].TrustDomain != "other.example" || rows[0].Source != "endpoint" || rows[0].Stale ||
		rows[0].X509Authorities != 1 || rows[0].JWTAuthorities < 1 || rows[0].FetchedAt == nil || time.Since(*rows[0].FetchedAt) > time.Minute {
		t.Errorf("meshidctl bundle list: %+v; want other.example fetched from its endpoint just now, fresh, with its root and JWT keys", rows)
	}
	out, _, code = ctl.run("bundle", "show", "other.example", "--format", "pem")
	if want := string(mustRead(t, filepath.Join(otherState, "ca", "root-cert.pem"))); code != 0 || out != want {
		t.Errorf("meshidctl bundle show --format pem: exit %d\n%s\nwant\n%s", code, out, want)
	}
	if _, _, code := ctl.run("bundle", "show", "nowhere.example"); code != 3 {
		t.Errorf("meshidctl bundle show of a trust domain not federated: exit %d, want 3", code)
	}
	out, errOut, code = ctl.run("check")
	if !strings.Contains(out, "other.example") || !strings.Contains(out, "bundle fresh") {
		t.Errorf("meshidctl check does not report other.example's bundle: exit %d\n%s%s", code, out, errOut)
	}
	// Its own bundle, as peers get it, carries its JWT-SVID keys.
	out, _, _ = ctl.run("bundle", "--format", "spiffe")
	own, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("cluster.local"), []byte(out))
	if err != nil || len(own.JWTAuthorities()) == 0 || len(own.X509Authorities()) == 0 {
		t.Errorf("meshidctl bundle --format spiffe: %v; want the roots and JWT keys:\n%s", err, out)
	}

	// Its own trust domain as a peer: refused before anything starts.
	mustWrite(t, config, []byte("federatesWith:\n- trustDomain: cluster.local\n  bundleEndpointURL: https://x\n  bundleEndpointProfile: {type: https_web}\n"), 0o644)
	cmd := exec.Command(binary("meshid-ca", "MESHID_E2E_CA_BIN"), append(args, "--federation-file="+config, "--grpc-addr=127.0.0.1:0", "--http-addr=127.0.0.1:0")...)
	combined, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(combined), "own trust domain") {
		t.Errorf("meshid-ca federating with its own trust domain: %v\n%s", err, combined)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}
