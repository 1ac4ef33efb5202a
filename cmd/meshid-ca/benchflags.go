//go:build !meshid_bench

package main

import (
	"github.com/spf13/pflag"

	"github.com/meshid/meshid/ca/ledger"
	"github.com/meshid/meshid/ca/server"
)

// addBenchFlags adds nothing: --bench-record-nothing exists only in
// binaries built with -tags meshid_bench (hack/perf-ledger.sh), never in a
// release, since a certificate not recorded breaks docs/design.md rule 6.
func addBenchFlags(*pflag.FlagSet, *options) {}

func issuanceRecorder(led *ledger.Ledger, _ bool) server.Recorder { return led }
