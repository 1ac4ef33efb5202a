// Command coredns is CoreDNS (github.com/coredns/coredns) with only the
// plugins a single-node test cluster needs, built from the Go module proxy
// by hack/kube-node.sh for hack/cluster.sh's cluster DNS. CoreDNS is built
// this way upstream too: a main that imports the plugins it wants.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	// The order plugins run in, as upstream's plugin.cfg has them.
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "cache", "kubernetes"}
	coremain.Run()
}
