package main

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshid/meshid/ca/admin/adminpb"
)

func TestCheckRenewal(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	// An intermediate lapsing in 30 days, due for renewal 10 days before.
	end := now.Add(30 * 24 * time.Hour)
	status := func(due time.Time, failing string) *adminpb.Status {
		return &adminpb.Status{
			Intermediate:             &adminpb.CACertificate{NotAfter: timestamppb.New(end)},
			IntermediateRenewalDue:   timestamppb.New(due),
			IntermediateRenewalError: failing,
		}
	}
	for _, tc := range []struct {
		name   string
		st     *adminpb.Status
		result string
		says   string
	}{
		{"due later", status(now.Add(time.Hour), ""), checkOK, "due in"},
		{"last attempt failed, not due", status(now.Add(time.Hour), "step-ca down"), checkWarn, "step-ca down"},
		{"due, not done", status(now.Add(-time.Hour), "step-ca down"), checkWarn, "step-ca down"},
		{"overdue by over half", status(now.Add(-31*24*time.Hour), "step-ca down"), checkFail, "overdue"},
	} {
		var r checkReport
		checkRenewal(&r, tc.st, now)
		if len(r.Checks) != 1 || r.Checks[0].Result != tc.result || !strings.Contains(r.Checks[0].Message, tc.says) {
			t.Errorf("%s: %+v, want %s saying %q", tc.name, r.Checks, tc.result, tc.says)
		}
	}
	var r checkReport
	checkRenewal(&r, &adminpb.Status{}, now)
	if len(r.Checks) != 0 {
		t.Errorf("a plug-in CA (no due time): %+v", r.Checks)
	}
}

func TestCheckFederation(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name   string
		b      *adminpb.FederatedBundle
		result string
		says   string
	}{
		{"fresh", &adminpb.FederatedBundle{TrustDomain: "a.example", Bundle: []byte("{}"), FetchedAt: timestamppb.New(now.Add(-time.Minute)), X509Authorities: 1}, checkOK, "a.example: bundle fresh, last fetched 60s ago"},
		{"stale", &adminpb.FederatedBundle{TrustDomain: "b.example", Bundle: []byte("{}"), Stale: true, Source: "store", LastError: "connection refused"}, checkWarn, "still trusted, from store): never fetched since meshid-ca started, refresh every 0s; last error: connection refused"},
		{"none", &adminpb.FederatedBundle{TrustDomain: "c.example", Stale: true, LastError: "no route"}, checkFail, "c.example: no bundle held"},
	} {
		var r checkReport
		checkFederationBundles(&r, []*adminpb.FederatedBundle{tc.b}, now)
		if len(r.Checks) != 1 || r.Checks[0].Result != tc.result || !strings.Contains(r.Checks[0].Message, tc.says) {
			t.Errorf("%s: %+v, want %s saying %q", tc.name, r.Checks, tc.result, tc.says)
		}
	}
}
