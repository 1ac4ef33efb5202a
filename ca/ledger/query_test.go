package ledger_test

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshid/meshid/ca/ledger"
)

// fixture is 60 records over three namespaces and five identities, some
// sharing an issue time, some without a pod, some not yet valid at t0, with
// lifetimes from 30 minutes to 3 hours.
func fixture() []ledger.Record {
	now := us(t0)
	var rs []ledger.Record
	for i := range 60 {
		rs = append(rs, rec(i, func(r *ledger.Record) {
			k := i % 5
			identity("ns-"+string(rune('a'+k/2)), fmt.Sprintf("sa-%d", k))(r)
			r.PodName = fmt.Sprintf("pod-%d", i%7)
			if i%11 == 0 {
				r.PodName, r.PodUID = "", ""
			}
			// Pairs share an issue time, so page boundaries fall inside ties.
			r.IssuedAt = now.Add(-time.Duration(i/2) * 10 * time.Minute)
			r.NotBefore = r.IssuedAt.Add(-time.Minute)
			r.NotAfter = r.IssuedAt.Add(time.Duration(i%6+1) * 30 * time.Minute)
			if i%13 == 0 {
				r.NotBefore = now.Add(time.Hour)
				r.NotAfter = now.Add(2 * time.Hour)
			}
		}))
	}
	return rs
}

// matches is what f means, for comparing with the database.
func matches(f ledger.Filter, r ledger.Record) bool {
	now := us(f.Now)
	valid := !r.NotBefore.After(now) && now.Before(r.NotAfter)
	switch {
	case f.SPIFFEID != "" && r.SPIFFEID != f.SPIFFEID,
		f.Namespace != "" && r.Namespace != f.Namespace,
		f.PodName != "" && r.PodName != f.PodName,
		f.Serial != "" && r.Serial != f.Serial,
		!f.IssuedSince.IsZero() && r.IssuedAt.Before(us(f.IssuedSince)),
		(f.ValidOnly || f.ExpiringWithin > 0) && !valid,
		f.ExpiringWithin > 0 && r.NotAfter.After(now.Add(f.ExpiringWithin)):
		return false
	}
	return true
}

// newestFirst is the ledger's order.
func newestFirst(a, b ledger.Record) int {
	if c := b.IssuedAt.Compare(a.IssuedAt); c != 0 {
		return c
	}
	return cmp.Compare(b.Serial, a.Serial)
}

func TestFilters(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		rs := fixture()
		record(t, l, rs...)
		now := t0
		earlier := t0.Add(-3 * time.Hour)
		for _, f := range []ledger.Filter{
			{},
			{SPIFFEID: "spiffe://cluster.local/ns-a/ns/sa/x"},
			{SPIFFEID: "spiffe://cluster.local/ns/ns-a/sa/sa-1"},
			{Namespace: "ns-b"},
			{Namespace: "nowhere"},
			{PodName: "pod-3"},
			{Serial: rs[17].Serial},
			{Serial: "ffffff"},
			{IssuedSince: t0.Add(-95 * time.Minute)},
			{IssuedSince: us(t0).Add(-90 * time.Minute)}, // exactly an issue time: included
			{ValidOnly: true, Now: now},
			{ValidOnly: true, Now: earlier},
			{ExpiringWithin: 30 * time.Minute, Now: now},
			{ExpiringWithin: time.Hour, Now: earlier},
			{ExpiringWithin: 90 * time.Minute, ValidOnly: true, Now: now},
			{Namespace: "ns-a", PodName: "pod-2"},
			{Namespace: "ns-b", ValidOnly: true, Now: now, IssuedSince: t0.Add(-2 * time.Hour)},
			{SPIFFEID: "spiffe://cluster.local/ns/ns-c/sa/sa-4", ExpiringWithin: 2 * time.Hour, Now: now},
			{SPIFFEID: "spiffe://cluster.local/ns/ns-c/sa/sa-4", Namespace: "ns-a"},
			{Serial: rs[3].Serial, Namespace: rs[3].Namespace, PodName: rs[3].PodName, SPIFFEID: rs[3].SPIFFEID, IssuedSince: rs[3].IssuedAt, ValidOnly: true, Now: now},
		} {
			var want []ledger.Record
			for _, r := range rs {
				if matches(f, r) {
					want = append(want, r)
				}
			}
			slices.SortFunc(want, newestFirst)
			for _, limit := range []int{0, 7, 1000} {
				f.Limit = limit
				got := all(t, l, f)
				if !slices.Equal(serials(got), serials(want)) {
					t.Errorf("Certificates(%+v):\n got %v\nwant %v", f, serials(got), serials(want))
				}
			}
		}
		// The fixture must exercise each filter: not all, not none.
		for name, f := range map[string]ledger.Filter{
			"valid":    {ValidOnly: true, Now: now},
			"expiring": {ExpiringWithin: 30 * time.Minute, Now: now},
			"since":    {IssuedSince: t0.Add(-95 * time.Minute)},
			"pod":      {PodName: "pod-3"},
		} {
			n := 0
			for _, r := range rs {
				if matches(f, r) {
					n++
				}
			}
			if n == 0 || n == len(rs) {
				t.Errorf("fixture: filter %s matches %d of %d", name, n, len(rs))
			}
		}
	})
}

func TestBadFilters(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		record(t, l, rec(1), rec(2))
		p, err := l.Certificates(context.Background(), ledger.Filter{Limit: 1})
		if err != nil || p.Next == "" {
			t.Fatalf("Certificates = %+v, %v", p, err)
		}
		for _, tc := range []struct {
			f   ledger.Filter
			msg string
		}{
			{ledger.Filter{Limit: 1001}, "Limit 1001 is above 1000"},
			{ledger.Filter{Limit: -1}, "Limit -1 is negative"},
			{ledger.Filter{ValidOnly: true}, "need Now"},
			{ledger.Filter{ExpiringWithin: time.Hour}, "need Now"},
			{ledger.Filter{ExpiringWithin: -time.Hour, Now: t0}, "negative"},
			{ledger.Filter{Serial: "XYZ"}, "not lower-case hex"},
			{ledger.Filter{PageToken: "garbage!"}, "page token"},
			{ledger.Filter{PageToken: p.Next + "A"}, "page token"},
			{ledger.Filter{PageToken: base64.RawURLEncoding.EncodeToString([]byte("1773500906535897:XYZ"))}, "page token"},
			{ledger.Filter{PageToken: base64.URLEncoding.EncodeToString([]byte("1773500906535897:abc"))}, "page token"},
			{ledger.Filter{PageToken: strings.Repeat("A", 200)}, "page token"},
		} {
			_, err := l.Certificates(context.Background(), tc.f)
			if err == nil || errors.Is(err, ledger.ErrUnavailable) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Certificates(%+v) = %v, want a refusal saying %q", tc.f, err, tc.msg)
			}
		}
	})
}

// TestPagination pages through 250 records, 100 at a time, while newer
// records keep arriving (they belong before the first page) and older ones
// are added (they belong to pages not read yet).
func TestPagination(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		var rs []ledger.Record
		for i := range 250 {
			// Triples share an issue time; the boundaries at 100 and 200
			// fall inside triples.
			rs = append(rs, rec(1000+i, func(r *ledger.Record) {
				r.IssuedAt = us(t0).Add(-time.Duration(i/3) * time.Minute)
			}))
		}
		record(t, l, rs...)

		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				newer := rec(100000+i, func(r *ledger.Record) { r.IssuedAt = us(t0).Add(time.Duration(i+1) * time.Second) })
				if err := l.Record(context.Background(), newer); err != nil {
					t.Error(err)
					return
				}
			}
		})

		seen := map[string]int{}
		var older []ledger.Record
		f := ledger.Filter{Limit: 100}
		pages := 0
		for {
			p, err := l.Certificates(context.Background(), f)
			if err != nil {
				t.Fatal(err)
			}
			pages++
			if pages == 1 && len(p.Records) != 100 {
				t.Fatalf("first page holds %d records", len(p.Records))
			}
			for _, r := range p.Records {
				seen[r.Serial]++
			}
			if p.Next == "" {
				break
			}
			// Records older than anything shown so far: the next pages
			// must show them.
			o := rec(200000+pages, func(r *ledger.Record) { r.IssuedAt = us(t0).Add(-24 * time.Hour) })
			record(t, l, o)
			older = append(older, o)
			f.PageToken = p.Next
		}
		close(stop)
		wg.Wait()

		// The first page started after some newer records; later ones are
		// newer than the first page and must not appear.
		want := append(slices.Clone(rs), older...)
		if pages != 3 {
			t.Errorf("%d pages, want 3", pages)
		}
		for _, r := range want {
			if seen[r.Serial] != 1 {
				t.Errorf("record %s seen %d times", r.Serial, seen[r.Serial])
			}
			delete(seen, r.Serial)
		}
		for s, n := range seen {
			if n != 1 {
				t.Errorf("record %s seen %d times", s, n)
			}
		}
	})
}

func TestIdentities(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		now := us(t0)
		web := identity("a", "web")
		record(t, l,
			// a/web: two valid (expiring in 1h and 30m), one expired.
			rec(1, web, func(r *ledger.Record) { r.IssuedAt = now.Add(-time.Minute); r.NotAfter = now.Add(time.Hour) }),
			rec(2, web, func(r *ledger.Record) { r.IssuedAt = now.Add(-2 * time.Minute); r.NotAfter = now.Add(30 * time.Minute) }),
			rec(3, web, func(r *ledger.Record) {
				r.IssuedAt = now.Add(-3 * time.Hour)
				r.NotBefore, r.NotAfter = now.Add(-3*time.Hour), now.Add(-2*time.Hour)
			}),
			// a/db: one not yet valid.
			rec(4, identity("a", "db"), func(r *ledger.Record) {
				r.IssuedAt = now.Add(-5 * time.Minute)
				r.NotBefore, r.NotAfter = now.Add(time.Minute), now.Add(time.Hour)
			}),
			// b/api: one expiring exactly at now (so not valid), one valid.
			rec(5, identity("b", "api"), func(r *ledger.Record) { r.IssuedAt = now.Add(-time.Hour); r.NotAfter = now }),
			rec(6, identity("b", "api"), func(r *ledger.Record) {
				r.IssuedAt = now.Add(-10 * time.Minute)
				r.NotAfter = now.Add(50 * time.Minute)
			}),
		)
		deny := func(id string) ledger.Denial {
			d := ledger.Denial{SPIFFEID: id, Reason: "compromised", By: "admin@example.com", At: now}
			if err := l.Deny(context.Background(), d); err != nil {
				t.Fatal(err)
			}
			return d
		}
		apiDenial := deny("spiffe://cluster.local/ns/b/sa/api")
		ghostDenial := deny("spiffe://cluster.local/ns/a/sa/ghost")
		oddDenial := deny("spiffe://cluster.local/custom/path")

		wantAll := []ledger.Identity{
			{SPIFFEID: "spiffe://cluster.local/custom/path", Denial: &oddDenial},
			{SPIFFEID: "spiffe://cluster.local/ns/a/sa/db", Namespace: "a", ServiceAccount: "db", LastIssued: now.Add(-5 * time.Minute)},
			{SPIFFEID: "spiffe://cluster.local/ns/a/sa/ghost", Namespace: "a", ServiceAccount: "ghost", Denial: &ghostDenial},
			{SPIFFEID: "spiffe://cluster.local/ns/a/sa/web", Namespace: "a", ServiceAccount: "web", ValidCerts: 2,
				LastIssued: now.Add(-time.Minute), SoonestExpiry: now.Add(30 * time.Minute)},
			{SPIFFEID: "spiffe://cluster.local/ns/b/sa/api", Namespace: "b", ServiceAccount: "api", ValidCerts: 1,
				LastIssued: now.Add(-10 * time.Minute), SoonestExpiry: now.Add(50 * time.Minute), Denial: &apiDenial},
		}
		for _, tc := range []struct {
			ns   string
			want []ledger.Identity
		}{
			{"", wantAll},
			{"a", wantAll[1:4]},
			{"b", wantAll[4:]},
			{"c", nil},
		} {
			got, err := l.Identities(context.Background(), tc.ns, t0)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.EqualFunc(got, tc.want, sameIdentity) {
				t.Errorf("Identities(%q):\n got %s\nwant %s", tc.ns, identities(got), identities(tc.want))
			}
		}
		// Later, everything has expired.
		got, err := l.Identities(context.Background(), "a", t0.Add(48*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 3 || got[2].ValidCerts != 0 || !got[2].SoonestExpiry.IsZero() || !got[2].LastIssued.Equal(now.Add(-time.Minute)) {
			t.Errorf("Identities(a, +48h) = %s", identities(got))
		}
		if _, err := l.Identities(context.Background(), "", time.Time{}); err == nil {
			t.Error("Identities without now succeeded")
		}
	})
}

func sameIdentity(a, b ledger.Identity) bool {
	if (a.Denial == nil) != (b.Denial == nil) || a.Denial != nil && *a.Denial != *b.Denial {
		return false
	}
	a.Denial, b.Denial = nil, nil
	return a == b
}

func identities(ids []ledger.Identity) string {
	var b strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&b, "\n\t%+v", id)
		if id.Denial != nil {
			fmt.Fprintf(&b, " denial=%+v", *id.Denial)
		}
	}
	return b.String()
}

func TestOutstanding(t *testing.T) {
	eachDB(t, func(t *testing.T, db testDB) {
		l := db.open(t)
		now := us(t0)
		cutoff := now.Add(-10 * time.Minute)
		ctx := context.Background()
		if n, last, err := l.Outstanding(ctx, cutoff, now); err != nil || n != 0 || !last.IsZero() {
			t.Fatalf("empty ledger: Outstanding = %d, %v, %v; want 0, zero time, nil", n, last, err)
		}
		web := identity("a", "web")
		record(t, l,
			// Issued before the cutoff, still valid: counted.
			rec(1, web, func(r *ledger.Record) { r.IssuedAt = cutoff.Add(-time.Minute); r.NotAfter = now.Add(time.Hour) }),
			rec(2, web, func(r *ledger.Record) { r.IssuedAt = cutoff.Add(-time.Hour); r.NotAfter = now.Add(2 * time.Hour) }),
			// Issued before, lapsed exactly now: not counted.
			rec(3, web, func(r *ledger.Record) { r.IssuedAt = cutoff.Add(-time.Hour); r.NotAfter = now }),
			// Issued at or after the cutoff: not counted.
			rec(4, web, func(r *ledger.Record) { r.IssuedAt = cutoff; r.NotAfter = now.Add(3 * time.Hour) }),
			rec(5, web, func(r *ledger.Record) { r.IssuedAt = now; r.NotAfter = now.Add(3 * time.Hour) }),
		)
		n, last, err := l.Outstanding(ctx, cutoff, now)
		if err != nil {
			t.Fatal(err)
		}
		if n != 2 || !last.Equal(now.Add(2*time.Hour)) {
			t.Errorf("Outstanding = %d, last lapses %v; want 2, %v", n, last, now.Add(2*time.Hour))
		}
		if _, _, err := l.Outstanding(ctx, time.Time{}, now); err == nil {
			t.Error("Outstanding with no cutoff: no error")
		}
	})
}
