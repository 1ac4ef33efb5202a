package ledger

import (
	"encoding/base64"
	"strings"
	"testing"
	"time"
)

func TestPageToken(t *testing.T) {
	c := cursor{issuedAt: time.Date(2026, 3, 14, 15, 9, 26, 535897000, time.UTC), serial: "7f3a9c"}
	tok := encodeToken(c)
	got, err := decodeToken(tok)
	if err != nil || got != c {
		t.Fatalf("decodeToken(encodeToken(%v)) = %v, %v", c, got, err)
	}
	for _, bad := range []string{
		"", "!!!!", tok + "=", tok + "A", strings.ToUpper(tok),
		encodeRaw("1773500966535897"), // no serial
		encodeRaw("x:7f3a9c"), encodeRaw("1773500966535897:"), encodeRaw("1773500966535897:7F3A9C"),
		encodeRaw("+1773500966535897:7f3a9c"), encodeRaw("01773500966535897:7f3a9c"),
		encodeRaw("-1:7f3a9c"), encodeRaw("99999999999999999999:7f3a9c"),
		encodeRaw("1773500966535897:7f3a9c:1"),
	} {
		if _, err := decodeToken(bad); err == nil || !strings.HasPrefix(err.Error(), "ledger: page token") {
			t.Errorf("decodeToken(%q) = %v, want an error", bad, err)
		}
	}
}

// encodeRaw encodes s as tokens are encoded, whatever s holds.
func encodeRaw(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// FuzzPageToken: the decoder never panics, refuses garbage with an error,
// and accepts only what the encoder writes.
func FuzzPageToken(f *testing.F) {
	f.Add(encodeToken(cursor{issuedAt: time.UnixMicro(1773500966535897).UTC(), serial: "7f3a9c"}))
	f.Add(encodeToken(cursor{issuedAt: time.UnixMicro(0).UTC(), serial: strings.Repeat("f", 40)}))
	f.Add("")
	f.Add("MTc3MzUwMDk2NjUzNTg5Nzo3ZjNhOWM")
	f.Add("garbage!")
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := decodeToken(tok)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "ledger: page token") {
				t.Fatalf("error %q lacks the prefix", err)
			}
			return
		}
		if encodeToken(c) != tok {
			t.Fatalf("decodeToken(%q) = %v, which encodes differently", tok, c)
		}
		if checkSerial(c.serial) != nil || c.issuedAt.Before(minTime) || !c.issuedAt.Before(maxTime) {
			t.Fatalf("decodeToken(%q) accepted %v", tok, c)
		}
	})
}
