// Package version holds what a meshid binary was built from, stamped by the
// linker (hack/images sets both):
//
//	-ldflags "-X github.com/meshid/meshid/internal/version.Version=0.1.0
//	          -X github.com/meshid/meshid/internal/version.Commit=<git commit>"
//
// A plain go build leaves Version "dev" and takes Commit from the Go
// toolchain's VCS stamp when there is one.
package version

import (
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// Set by the linker.
var (
	Version = "dev"
	Commit  = ""
)

// Revision is the commit the binary was built from: Commit, else the Go
// toolchain's vcs.revision (with "-dirty" for a modified tree), else
// "unknown".
func Revision() string {
	if Commit != "" {
		return Commit
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	var rev, dirty string
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return "unknown"
	}
	return rev + dirty
}

// Collector is the gauge <namespace>_build_info{version,revision} 1, as
// Prometheus' own exporters publish it.
func Collector(namespace string) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace:   namespace,
		Name:        "build_info",
		Help:        "What the binary was built from; always 1.",
		ConstLabels: prometheus.Labels{"version": Version, "revision": Revision()},
	})
	g.Set(1)
	return g
}
