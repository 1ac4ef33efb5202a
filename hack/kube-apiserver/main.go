// Command kube-apiserver is a thin wrapper around the upstream Kubernetes API
// server (k8s.io/kubernetes/cmd/kube-apiserver), built from the Go module proxy
// by hack/kube-assets.sh for envtest (KUBEBUILDER_ASSETS).
//
// It lives in its own module so that the project's root go.mod never carries
// the k8s.io/* staging replace block that k8s.io/kubernetes requires.
package main

import (
	"os"
	_ "time/tzdata" // for timeZone support in CronJob

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // load all the prometheus client-go plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	command := app.NewAPIServerCommand()
	code := cli.Run(command)
	os.Exit(code)
}
