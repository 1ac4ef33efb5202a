package agent

import (
	"log/slog"
	"sync"
	"time"
)

// skewWarnThreshold is how far behind the CA this node's clock must be
// before the agent says so: less is within what NTP leaves and what the
// CA's backdating of NotBefore absorbs.
const skewWarnThreshold = 5 * time.Second

// caClock is the agent's estimate of the CA's clock, learnt from the
// certificates it signs. Renewal and expiry are scheduled in the CA's time,
// because a certificate's NotBefore and NotAfter are written in it: on a
// node whose clock is behind, renewing at NotAfter read by the local clock
// would serve a certificate past its end by the whole skew.
//
// Only a clock behind the CA is corrected. Each answer proves a lower bound
// on the CA's time when it signed (NotBefore, and NotAfter less the lifetime
// asked, since the CA grants no more), and a correction up to a lower bound
// never overshoots. A clock ahead only makes the agent renew, and give up on
// an expiring certificate, earlier than it must: safe, and with a lifetime
// of an hour and a skew of minutes, a few per cent early.
type caClock struct {
	now func() time.Time // this node's clock
	log *slog.Logger
	obs ClockObserver // nil: none

	mu     sync.Mutex
	behind time.Duration // how far this node's clock is behind the CA's, at least
}

// ClockObserver hears how far behind the CA's clock the agent has found its
// own, after each certificate (for metrics). An Observer may implement it.
type ClockObserver interface {
	ClockBehind(d time.Duration)
}

// Now is the CA's time, as far as the agent knows it.
func (c *caClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now().Add(c.behind)
}

// Until is how long until t, a time in the CA's clock.
func (c *caClock) Until(t time.Time) time.Duration { return t.Sub(c.Now()) }

// learn takes the evidence of one certificate: the CA signed it at or after
// signedAfter (in the CA's clock), and this node's clock read received when
// the answer came, later than the signing. The latest evidence wins, so a
// node clock that NTP steps back into line is believed again.
func (c *caClock) learn(signedAfter, received time.Time) {
	behind := max(signedAfter.Sub(received), 0).Round(time.Millisecond)
	c.mu.Lock()
	was := c.behind
	c.behind = behind
	c.mu.Unlock()
	switch {
	case behind >= skewWarnThreshold && (was < skewWarnThreshold || absDuration(behind-was) >= skewWarnThreshold):
		c.log.Warn("this node's clock is behind the CA's: renewals and expiry follow the CA's clock (fix the node's time sync: peers judge certificates by theirs)",
			"behind_at_least", behind.String())
	case behind < skewWarnThreshold && was >= skewWarnThreshold:
		c.log.Info("this node's clock agrees with the CA's again", "behind_at_least", behind.String())
	}
	if c.obs != nil {
		c.obs.ClockBehind(behind)
	}
}

// signedAfter is a lower bound on when the CA signed leaf, in its clock: not
// before NotBefore (the CA backdates it) nor before NotAfter less the
// lifetime asked (the CA may grant less, never more).
func signedAfter(notBefore, notAfter time.Time, asked time.Duration) time.Time {
	if asked <= 0 {
		return notBefore
	}
	if t := notAfter.Add(-asked); t.After(notBefore) {
		return t
	}
	return notBefore
}

func absDuration(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
