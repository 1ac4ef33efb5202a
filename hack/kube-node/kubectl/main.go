// Command kubectl is the upstream kubectl (k8s.io/kubectl), built from the Go
// module proxy by hack/kube-node.sh, so that hack/cluster.sh's cluster can be
// looked at by hand.
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
