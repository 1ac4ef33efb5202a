package k8sauth

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/metadata"
)

// BearerToken reads the one authorization header of a gRPC request,
// "Bearer <token>". Its errors never contain the token.
func BearerToken(md metadata.MD) (string, error) {
	vals := md.Get("authorization")
	if len(vals) != 1 {
		return "", fmt.Errorf("want one authorization header, got %d", len(vals))
	}
	scheme, token, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || strings.TrimSpace(token) == "" {
		return "", errors.New("authorization header is not a bearer token")
	}
	return strings.TrimSpace(token), nil
}
