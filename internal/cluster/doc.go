// Package cluster runs a real single-node Kubernetes cluster on this
// machine, for meshid's end-to-end tests and for trying the chart: etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler, a kubelet on
// containerd + runc with the CNI bridge plugin, kube-proxy (iptables) and
// CoreDNS, each a process of its own with its log in the state directory.
//
// Nothing is pulled: images come from archives imported into containerd
// (Import), the sandbox ("pause") image included. Everything binds to one
// address of its own (the node IP, added to the loopback device), so the
// cluster leaves the host's ports and networks alone and Down removes all of
// it: processes, containers, mounts, network devices, iptables rules and the
// state directory.
//
// It needs root, cgroups, overlayfs, the bridge netfilter sysctls, and
// containerd, runc, iptables and the CNI plugins (Debian's containerd, runc,
// iptables and containernetworking-plugins); Up checks each first and says
// which is missing.
package cluster
