package k8sauth

import (
	"testing"
	"time"
)

func TestUnverifiedExpiry(t *testing.T) {
	for tok, want := range map[string]time.Time{
		"eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjE3OTQ0MDAwMDB9.sig": time.Unix(1794400000, 0),
		"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.sig":          {},
		"eyJhbGciOiJFUzI1NiJ9.eyJleHAiOi0xfQ.sig":           {},
		"no-dots": {},
		"a.!!!.c": {},
	} {
		if got := unverifiedExpiry(tok); !got.Equal(want) {
			t.Errorf("unverifiedExpiry(%q) = %v, want %v", tok, got, want)
		}
	}
}

// FuzzUnverifiedExpiry: reading exp from any string never panics and never
// yields a time before 1970.
func FuzzUnverifiedExpiry(f *testing.F) {
	f.Add("eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjE3OTQ0MDAwMDB9.sig")
	f.Add("eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjEuNWUzMDB9.sig")
	f.Add("..")
	f.Fuzz(func(t *testing.T, tok string) {
		if got := unverifiedExpiry(tok); !got.IsZero() && got.Unix() <= 0 {
			t.Fatalf("expiry %v", got)
		}
	})
}

func FuzzParseUsername(f *testing.F) {
	f.Add("system:serviceaccount:demo:web")
	f.Add("system:serviceaccount:a:b:c")
	f.Fuzz(func(t *testing.T, s string) {
		ns, sa, err := ParseUsername(s)
		if err == nil && s != saUserPrefix+ns+":"+sa {
			t.Fatalf("ParseUsername(%q) = %q, %q", s, ns, sa)
		}
	})
}
