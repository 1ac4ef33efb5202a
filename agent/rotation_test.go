package agent

import (
	"testing"
	"time"
)

func TestRenewAt(t *testing.T) {
	nb := time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	na := nb.Add(time.Hour)
	r := DefaultRotation
	for _, tc := range []struct {
		u    float64
		want time.Duration
	}{
		{0, 24 * time.Minute},   // 50% - 10%
		{0.5, 30 * time.Minute}, // half life
		{0.999999, 36 * time.Minute},
	} {
		got := r.RenewAt(nb, na, tc.u).Sub(nb).Round(time.Second)
		if got != tc.want {
			t.Errorf("u=%v: renew %s after NotBefore, want %s", tc.u, got, tc.want)
		}
	}
	if got := r.RenewAt(na, nb, 0.5); !got.Equal(na) {
		t.Errorf("inverted validity: %v, want NotBefore (renew now)", got)
	}
}

func TestRotationValidate(t *testing.T) {
	for _, bad := range []Rotation{{0, 0}, {1, 0}, {0.5, -0.1}, {0.5, 0.5}, {0.9, 0.1}} {
		if bad.Validate() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if err := DefaultRotation.Validate(); err != nil {
		t.Errorf("default refused: %v", err)
	}
}

func TestBackoff(t *testing.T) {
	b := Backoff{Initial: time.Second, Max: 10 * time.Second}
	for _, tc := range []struct {
		attempt  int
		u        float64
		min, max time.Duration
	}{
		{0, 0, 500 * time.Millisecond, 500 * time.Millisecond},
		{0, 0.999, 500 * time.Millisecond, time.Second},
		{1, 0.5, time.Second, 2 * time.Second},
		{3, 0.999, 4 * time.Second, 8 * time.Second},
		{4, 0, 5 * time.Second, 5 * time.Second},       // capped at Max
		{60, 0.999, 5 * time.Second, 10 * time.Second}, // no overflow
	} {
		got := b.Delay(tc.attempt, tc.u)
		if got < tc.min || got > tc.max {
			t.Errorf("attempt %d, u %v: %s, want in [%s, %s]", tc.attempt, tc.u, got, tc.min, tc.max)
		}
	}
}
