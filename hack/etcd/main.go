// Command etcd is a thin wrapper around the upstream etcd server
// (go.etcd.io/etcd/server/v3/etcdmain), built from the Go module proxy by
// hack/kube-assets.sh for envtest (KUBEBUILDER_ASSETS).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
