// Package logging makes the structured logger every meshid binary writes to
// stderr, and routes client-go's klog into it.
package logging

import (
	"fmt"
	"log/slog"
	"os"

	"k8s.io/klog/v2"
)

// New logs at level in format "json" or "text", and sends klog there too.
func New(format string, level slog.Level) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch format {
	case "json":
		h = slog.NewJSONHandler(os.Stderr, opts)
	case "text":
		h = slog.NewTextHandler(os.Stderr, opts)
	default:
		return nil, fmt.Errorf("--log-format must be json or text, not %q", format)
	}
	log := slog.New(h)
	klog.SetSlogLogger(log.With("source", "client-go"))
	return log, nil
}
