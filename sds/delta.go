package sds

import (
	"maps"
	"slices"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DeltaSecrets serves incremental SDS: the proxy subscribes and unsubscribes
// by name, tells on its first request which versions it already has, and
// gets only resources whose version differs from what it holds.
func (s *Server) DeltaSecrets(stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	s.streams.Add(1)
	defer s.streams.Add(-1)
	ctx := stream.Context()
	st := &state{s: s, ctx: ctx}
	defer st.close()

	reqs, recvErr := receive(ctx, stream.Recv)

	var (
		node      string
		lastNonce string
		subs      = map[string]bool{}
		has       = map[string]string{} // name → version the proxy holds (or was sent)
	)
	send := func() error {
		rs, err := st.build(slices.Sorted(maps.Keys(subs)))
		if err != nil {
			s.log.Error("sds: building secrets", "node", node, "error", err)
			return status.Error(codes.Internal, "sds: cannot build secrets")
		}
		resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: SecretType}
		for _, r := range rs {
			if has[r.name] == r.version {
				continue
			}
			resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: r.name, Version: r.version, Resource: r.any})
		}
		if len(resp.Resources) == 0 {
			return nil
		}
		resp.Nonce = s.nonce()
		resp.SystemVersionInfo = versionOf(rs)
		if err := stream.Send(resp); err != nil {
			return err
		}
		for _, r := range resp.Resources {
			has[r.Name] = r.Version
		}
		lastNonce = resp.Nonce
		return nil
	}
	return serveLoop(st, reqs, recvErr, send, func(req *discoveryv3.DeltaDiscoveryRequest) error {
		if node == "" && req.GetNode() != nil {
			node = req.GetNode().GetId()
		}
		if d := req.GetErrorDetail(); d != nil && req.GetResponseNonce() == lastNonce {
			// NACK: the proxy keeps what it had; what it refused is
			// not sent again until it changes.
			s.log.Warn("sds: proxy rejected secrets", "node", node, "error", d.GetMessage())
		}
		if err := checkNames(req.GetTypeUrl(), req.GetResourceNamesSubscribe()); err != nil {
			return err
		}
		for name, v := range req.GetInitialResourceVersions() {
			has[name] = v
		}
		for _, name := range req.GetResourceNamesSubscribe() {
			subs[name] = true
		}
		for _, name := range req.GetResourceNamesUnsubscribe() {
			delete(subs, name)
			delete(has, name)
		}
		return st.need(slices.Collect(maps.Keys(subs)))
	})
}
