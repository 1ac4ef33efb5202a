package ledger

import (
	"encoding/base64"
	"strconv"
	"strings"
	"time"
)

// A page token is base64url (no padding) of "<issued_at in Unix
// microseconds>:<serial>": the last row of the page before, from which the
// next page continues in (issued_at DESC, serial DESC) order. Only the
// canonical encoding is accepted, so a token has one spelling.

// maxTokenLen bounds a token before it is decoded: 20 digits, a colon and
// 40 hex digits, in base64.
const maxTokenLen = 96

// cursor is the position a page token encodes.
type cursor struct {
	issuedAt time.Time
	serial   string
}

func encodeToken(c cursor) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(c.issuedAt.UnixMicro(), 10) + ":" + c.serial))
}

func decodeToken(tok string) (cursor, error) {
	bad := func(why string) (cursor, error) {
		return cursor{}, errorf("page token %.40q is not one this ledger made: %s", tok, why)
	}
	if len(tok) > maxTokenLen {
		return bad("too long")
	}
	raw, err := base64.RawURLEncoding.Strict().DecodeString(tok)
	if err != nil {
		return bad("not base64url")
	}
	micros, serial, ok := strings.Cut(string(raw), ":")
	if !ok {
		return bad("no separator")
	}
	us, err := strconv.ParseInt(micros, 10, 64)
	if err != nil {
		return bad("bad time")
	}
	if err := checkSerial(serial); err != nil {
		return bad(err.Error())
	}
	c := cursor{issuedAt: time.UnixMicro(us).UTC(), serial: serial}
	if c.issuedAt.Before(minTime) || !c.issuedAt.Before(maxTime) {
		return bad("time out of range")
	}
	if encodeToken(c) != tok {
		return bad("not canonical")
	}
	return c, nil
}
