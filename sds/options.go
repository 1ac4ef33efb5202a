package sds

import (
	"context"
	"strings"

	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/tap"
)

// ServerOptions are the gRPC server settings the SDS service needs, and
// suit a node agent's sockets: one connection per proxy, mostly idle, so
// buffers are small and the write buffer is held only while writing.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(1 << 20),
		// A stream's token is at most 16 KiB; grpc-go would take 16 MiB
		// of headers.
		grpc.MaxHeaderListSize(64 << 10),
		grpc.ReadBufferSize(4 << 10),
		grpc.WriteBufferSize(4 << 10),
		grpc.SharedWriteBuffer(true),
		grpc.InTapHandle(cancellableStreams),
	}
}

// streamCancelKey holds the function that ends an SDS stream's context.
type streamCancelKey struct{}

// cancellableStreams gives each SDS stream a context the server can end.
// gRPC gives a handler no other way to end its stream while it waits in
// Recv; without one, every stream would need a second goroutine to wait on
// pushes and token expiry beside the one reading requests.
func cancellableStreams(ctx context.Context, info *tap.Info) (context.Context, error) {
	if !strings.HasPrefix(info.FullMethodName, "/"+secretv3.SecretDiscoveryService_ServiceDesc.ServiceName+"/") {
		return ctx, nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	return context.WithValue(ctx, streamCancelKey{}, cancel), nil
}
