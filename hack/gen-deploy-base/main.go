// Command gen-deploy-base writes the kustomize base deploy/base from the Helm
// chart deploy/charts/meshid rendered with its default values, so that both
// install the same objects. Run it from the repository's root after changing
// the chart:
//
//	go run ./hack/gen-deploy-base
//
// TestHelmBaseMatchesChart (e2e) fails when deploy/base is not what this
// writes.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshid/meshid/internal/chart"
)

func main() {
	if err := run(filepath.Join("deploy", "charts", "meshid"), filepath.Join("deploy", "base")); err != nil {
		fmt.Fprintln(os.Stderr, "gen-deploy-base:", err)
		os.Exit(1)
	}
}

func run(chartDir, baseDir string) error {
	files, err := chart.Base(chartDir)
	if err != nil {
		return err
	}
	// Files of an earlier generation that the chart no longer renders.
	old, err := filepath.Glob(filepath.Join(baseDir, "*.yaml"))
	if err != nil {
		return err
	}
	for _, path := range old {
		if _, ok := files[filepath.Base(path)]; !ok {
			if err := os.Remove(path); err != nil {
				return err
			}
			fmt.Println("removed", path)
		}
	}
	for name, data := range files {
		path := filepath.Join(baseDir, name)
		if cur, err := os.ReadFile(path); err == nil && string(cur) == string(data) {
			continue
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			return err
		}
		fmt.Println("wrote", path)
	}
	return nil
}
