// Package poll lets a test wait for a condition it cannot be told about,
// with a deadline that leaves room on a busy 2-core machine.
package poll

import (
	"testing"
	"time"
)

// Deadline is how long Until waits before failing the test.
const Deadline = 30 * time.Second

// Until checks cond every millisecond until it holds, and fails t if it
// does not within Deadline.
func Until(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Deadline)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", Deadline, what)
		}
		time.Sleep(time.Millisecond) // poll interval
	}
}
