package ledger

import (
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxSerialHex is 20 octets, the longest serial RFC 5280 allows.
const maxSerialHex = 40

// maxText bounds the free-text fields of records and denials.
const maxText = 1024

// Times outside these years cannot be stored the same way by both
// databases; no certificate needs them.
var (
	minTime = time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC)
	maxTime = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
)

// checkSerial accepts a serial as fmt.Sprintf("%x", serial) writes it. Its
// error has no package prefix: callers say what the serial was for.
func checkSerial(s string) error {
	if s == "" {
		return fmt.Errorf("serial is empty")
	}
	if len(s) > maxSerialHex {
		return fmt.Errorf("serial %.48q is longer than %d hex digits", s, maxSerialHex)
	}
	if !isHex(s) {
		return fmt.Errorf("serial %q is not lower-case hex", s)
	}
	return nil
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// isSHA256 accepts "" or 64 lower-case hex digits.
func isSHA256(s string) bool {
	return s == "" || (len(s) == 64 && isHex(s))
}

// normalize checks r and returns it with its times in UTC, cut to the
// microsecond, as the databases store them: what Record stores is then
// exactly what the queries return.
func normalize(r Record) (Record, error) {
	if err := checkSerial(r.Serial); err != nil {
		return Record{}, errorf("record: %v", err)
	}
	bad := func(format string, args ...any) (Record, error) {
		return Record{}, errorf("record %s: "+format, append([]any{r.Serial}, args...)...)
	}
	if _, err := spiffeid.FromString(r.SPIFFEID); err != nil {
		return bad("SPIFFE ID %q: %v", r.SPIFFEID, err)
	}
	for _, f := range []struct{ name, v string }{
		{"Namespace", r.Namespace}, {"ServiceAccount", r.ServiceAccount}, {"PodName", r.PodName},
		{"PodUID", r.PodUID}, {"ClusterID", r.ClusterID}, {"AuthMethod", r.AuthMethod},
	} {
		if len(f.v) > maxText {
			return bad("%s is longer than %d bytes", f.name, maxText)
		}
	}
	if r.RequestedBy != "" {
		if _, err := spiffeid.FromString(r.RequestedBy); err != nil {
			return bad("RequestedBy %.80q: %v", r.RequestedBy, err)
		}
	}
	if !isSHA256(r.PublicKeySHA256) {
		return bad("PublicKeySHA256 %.80q is not a lower-case hex SHA-256", r.PublicKeySHA256)
	}
	if !isSHA256(r.IssuerFingerprint) {
		return bad("IssuerFingerprint %.80q is not a lower-case hex SHA-256", r.IssuerFingerprint)
	}
	for _, f := range []struct {
		name string
		t    *time.Time
	}{{"NotBefore", &r.NotBefore}, {"NotAfter", &r.NotAfter}, {"IssuedAt", &r.IssuedAt}} {
		if f.t.IsZero() {
			return bad("%s is not set", f.name)
		}
		*f.t = f.t.UTC().Truncate(time.Microsecond)
		if f.t.Before(minTime) || !f.t.Before(maxTime) {
			return bad("%s %s is outside years 1970-9999", f.name, f.t.Format(time.RFC3339))
		}
	}
	if !r.NotAfter.After(r.NotBefore) {
		return bad("NotAfter %s is not after NotBefore %s", r.NotAfter.Format(time.RFC3339Nano), r.NotBefore.Format(time.RFC3339Nano))
	}
	return r, nil
}

// checkDenial refuses a denial without a valid SPIFFE ID, author or time.
func checkDenial(d Denial) (Denial, error) {
	if _, err := spiffeid.FromString(d.SPIFFEID); err != nil {
		return Denial{}, errorf("denial: SPIFFE ID %q: %v", d.SPIFFEID, err)
	}
	switch {
	case d.By == "":
		return Denial{}, errorf("denial of %s: By (who denies) is empty", d.SPIFFEID)
	case len(d.By) > maxText || len(d.Reason) > maxText:
		return Denial{}, errorf("denial of %s: By or Reason is longer than %d bytes", d.SPIFFEID, maxText)
	case d.At.IsZero():
		return Denial{}, errorf("denial of %s: At is not set", d.SPIFFEID)
	}
	d.At = d.At.UTC().Truncate(time.Microsecond)
	if d.At.Before(minTime) || !d.At.Before(maxTime) {
		return Denial{}, errorf("denial of %s: At %s is outside years 1970-9999", d.SPIFFEID, d.At.Format(time.RFC3339))
	}
	return d, nil
}
