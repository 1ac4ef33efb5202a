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
func (s *Server) DeltaSecrets(gs grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	s.streams.Add(1)
	defer s.streams.Add(-1)
	st, err := s.open(gs.Context())
	if err != nil {
		return err
	}
	defer st.close()

	// Guarded by st.mu.
	var (
		lastNonce string
		subs      = map[string]bool{}
		has       = map[string]string{} // name → version the proxy holds (or was sent)
	)
	st.send = func() error {
		w, node := st.current()
		st.mu.Lock()
		names := slices.Sorted(maps.Keys(subs))
		held := maps.Clone(has)
		st.mu.Unlock()
		rs, err := s.build(w, names)
		if err != nil {
			s.log.Error("sds: building secrets", "node", node, "error", err)
			return status.Error(codes.Internal, "sds: cannot build secrets")
		}
		resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: SecretType}
		for _, r := range rs {
			if held[r.name] == r.version {
				continue
			}
			resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: r.name, Version: r.version, Resource: r.any})
		}
		if len(resp.Resources) == 0 {
			return nil
		}
		resp.Nonce = s.nonce()
		resp.SystemVersionInfo = versionOf(rs)
		if err := gs.Send(resp); err != nil {
			return err
		}
		st.mu.Lock()
		for _, r := range resp.Resources {
			if subs[r.Name] { // not unsubscribed meanwhile
				has[r.Name] = r.Version
			}
		}
		lastNonce = resp.Nonce
		st.mu.Unlock()
		return nil
	}
	return serve(st, gs.Recv, func(req *discoveryv3.DeltaDiscoveryRequest) error {
		st.setNode(req.GetNode())
		_, node := st.current()
		st.mu.Lock()
		nonce := lastNonce
		st.mu.Unlock()
		if d := req.GetErrorDetail(); d != nil && req.GetResponseNonce() == nonce {
			// NACK: the proxy keeps what it had; what it refused is
			// not sent again until it changes.
			s.log.Warn("sds: proxy rejected secrets", "node", node, "error", d.GetMessage())
		}
		if _, err := checkNames(req.GetTypeUrl(), req.GetResourceNamesSubscribe()); err != nil {
			return err
		}
		st.mu.Lock()
		for name, v := range req.GetInitialResourceVersions() {
			// Only what is served: a proxy's list of versions must not
			// grow the stream's memory with names of its choosing.
			if name == WorkloadCertName || name == RootCertName {
				has[name] = v
			}
		}
		for _, name := range req.GetResourceNamesSubscribe() {
			subs[name] = true
		}
		for _, name := range req.GetResourceNamesUnsubscribe() {
			delete(subs, name)
			delete(has, name)
		}
		names := slices.Collect(maps.Keys(subs))
		st.mu.Unlock()
		if err := st.need(names); err != nil {
			return err
		}
		st.kick()
		return nil
	})
}
