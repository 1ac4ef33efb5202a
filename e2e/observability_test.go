package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestDashboardAndAlertsUseDefinedMetrics: every metric the Grafana
// dashboard and the alerting rules query is one meshid defines (a renamed
// or mistyped metric would leave a panel empty and an alert silent).
func TestDashboardAndAlertsUseDefinedMetrics(t *testing.T) {
	defined := map[string]bool{}
	nameRE := regexp.MustCompile(`Name:\s+"(meshid_[a-z_]+)"`)
	// Metrics a package registers under its caller's prefix:
	// k8sauth.NewMetrics(reg, "meshid_ca") and Name: prefix + "_token_…".
	prefixRE := regexp.MustCompile(`NewMetrics\(\w+, "(meshid_[a-z]+)"\)`)
	suffixRE := regexp.MustCompile(`Name:\s+prefix \+ "(_[a-z_]+)"`)
	var prefixes, suffixes []string
	filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return err
		}
		b, _ := os.ReadFile(path)
		for _, m := range nameRE.FindAllStringSubmatch(string(b), -1) {
			defined[m[1]] = true
		}
		for _, m := range prefixRE.FindAllStringSubmatch(string(b), -1) {
			prefixes = append(prefixes, m[1])
		}
		for _, m := range suffixRE.FindAllStringSubmatch(string(b), -1) {
			suffixes = append(suffixes, m[1])
		}
		return nil
	})
	for _, p := range prefixes {
		for _, s := range suffixes {
			defined[p+s] = true
		}
	}
	if len(defined) < 10 {
		t.Fatalf("found only %d metric definitions: %v", len(defined), defined)
	}

	var exprs []string
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	b, err := os.ReadFile("../deploy/grafana/meshid-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
		}
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `json:"alert"`
				Expr  string `json:"expr"`
			} `json:"rules"`
		} `json:"groups"`
	}
	b, err = os.ReadFile("../deploy/prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("alerts: %v", err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" || r.Expr == "" {
				t.Errorf("rule %+v lacks a name or an expression", r)
			}
			exprs = append(exprs, r.Expr)
		}
	}
	used := regexp.MustCompile(`meshid_[a-z_]+`)
	for _, e := range exprs {
		for _, name := range used.FindAllString(e, -1) {
			base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
			if !defined[base] {
				t.Errorf("%q queries %s, which meshid does not define", e, name)
			}
		}
	}
}
