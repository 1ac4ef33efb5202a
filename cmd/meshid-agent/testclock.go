//go:build meshid_testclock

package main

import (
	"context"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spf13/pflag"
)

// Built only with -tags meshid_testclock, for e2e/faults: Go reads the
// clock through the vDSO, so faketime cannot skew a Go process, and the
// suite needs an agent whose clock is off the CA's. --test-clock-skew-file
// names a file holding a duration (e.g. -40s) added to every reading of the
// clock the certificate manager schedules by; it is read again every
// 200 ms, so a running agent's clock can be stepped.

func addTestClockFlags(fs *pflag.FlagSet, o *options) {
	fs.StringVar(&o.testClockSkewFile, "test-clock-skew-file", "", "test builds only: a file holding a duration added to the agent's clock")
}

func (o *options) clock(ctx context.Context) func() time.Time {
	if o.testClockSkewFile == "" {
		return time.Now
	}
	var skew atomic.Int64
	read := func() {
		data, err := os.ReadFile(o.testClockSkewFile)
		if err != nil {
			return
		}
		if d, err := time.ParseDuration(strings.TrimSpace(string(data))); err == nil {
			skew.Store(int64(d))
		}
	}
	read()
	go func() {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				read()
			}
		}
	}()
	return func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
}
