//go:build !meshid_testclock

package main

import (
	"context"
	"time"

	"github.com/spf13/pflag"
)

// The agent's clock is the system's; testclock.go, in test builds only,
// lets e2e/faults skew it.
func addTestClockFlags(*pflag.FlagSet, *options) {}

func (o *options) clock(context.Context) func() time.Time { return time.Now }
