// Command kube-scheduler is the upstream scheduler
// (k8s.io/kubernetes/cmd/kube-scheduler), built from the Go module proxy by
// hack/kube-node.sh for hack/cluster.sh.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	os.Exit(cli.Run(app.NewSchedulerCommand()))
}
