//go:build meshid_bench

package main

import (
	"context"

	"github.com/spf13/pflag"

	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/server"
)

// addBenchFlags adds --bench-record-nothing to benchmark builds: the same
// server, with its ledger open for everything else, but issuing without
// recording, the baseline of hack/perf-ledger.sh's process mode.
func addBenchFlags(fs *pflag.FlagSet, o *options) {
	fs.BoolVar(&o.recordNothing, "bench-record-nothing", false, "BENCHMARK BUILD ONLY: issue certificates without recording them in the ledger (the baseline of hack/perf-ledger.sh)")
}

type recordNothing struct{}

func (recordNothing) Record(context.Context, ledger.Record) error { return nil }

func issuanceRecorder(led *ledger.Ledger, nothing bool) server.Recorder {
	if nothing {
		return recordNothing{}
	}
	return led
}
