package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/ledger"
)

// TestIssuanceIsRecorded: what the ledger holds for a certificate is
// exactly who got it, how they proved it, and nothing secret.
func TestIssuanceIsRecorded(t *testing.T) {
	e := newEnv(t, envOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+e.token(t, "demo", "web"), "clusterid", "Kubernetes")
	before := time.Now()
	resp, err := e.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil), ValidityDuration: 3600})
	if err != nil {
		t.Fatal(err)
	}
	chain, err := agent.ParseChain(resp.CertChain)
	if err != nil {
		t.Fatal(err)
	}
	leaf := chain[0]
	rec, err := e.ledger.Certificate(context.Background(), fmt.Sprintf("%x", leaf.SerialNumber))
	if err != nil {
		t.Fatalf("the certificate returned is not in the ledger: %v", err)
	}
	spki := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	want := ledger.Record{
		Serial: fmt.Sprintf("%x", leaf.SerialNumber), SPIFFEID: webID.String(),
		Namespace: "demo", ServiceAccount: "web", PodName: "web-0", PodUID: "demo-web-0", ClusterID: "Kubernetes",
		PublicKeySHA256: hex.EncodeToString(spki[:]), NotBefore: leaf.NotBefore.UTC(), NotAfter: leaf.NotAfter.UTC(),
		IssuerFingerprint: ca.Fingerprint(chain[1]), AuthMethod: "jwks", IssuedAt: rec.IssuedAt,
	}
	if rec != want {
		t.Errorf("ledger holds\n%+v\nwant\n%+v", rec, want)
	}
	if rec.IssuedAt.Before(before.Add(-time.Second)) || rec.IssuedAt.After(time.Now()) {
		t.Errorf("issued at %s, not during the call", rec.IssuedAt)
	}
}

// TestDeniedIdentityGetsNothing: a denied identity is refused with
// PermissionDenied and nothing is signed or recorded; others go on.
func TestDeniedIdentityGetsNothing(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.denied.Replace([]ledger.Denial{{SPIFFEID: webID.String(), Reason: "test", By: "admin", At: time.Now()}})
	_, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
	if status.Code(err) != codes.PermissionDenied || status.Convert(err).Message() != msgDenied {
		t.Fatalf("denied identity: %v, want PermissionDenied %q", err, msgDenied)
	}
	page, err := e.ledger.Certificates(context.Background(), ledger.Filter{SPIFFEID: webID.String()})
	if err != nil || len(page.Records) != 0 {
		t.Fatalf("denied identity has %d records (%v)", len(page.Records), err)
	}
	e.denied.Replace(nil)
	if _, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)}); err != nil {
		t.Fatalf("allowed again, still refused: %v", err)
	}
}

// TestLedgerDownNothingReturned: when the certificate cannot be recorded
// the caller gets Unavailable and no certificate (docs/design.md, rule 6).
func TestLedgerDownNothingReturned(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.ledger.Close()
	resp, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
	if status.Code(err) != codes.Unavailable || resp != nil {
		t.Fatalf("ledger closed: %v, %v; want Unavailable and nothing", resp, err)
	}
	if status.Convert(err).Message() != msgNotRecorded {
		t.Errorf("message %q, want %q", status.Convert(err).Message(), msgNotRecorded)
	}
	if e.issued() != 0 {
		t.Errorf("%d counted as issued", e.issued())
	}
}

// pausingRecorder records through the real ledger, after the test lets it.
type pausingRecorder struct {
	Recorder
	entered, release chan struct{}
}

func (p *pausingRecorder) Record(ctx context.Context, r ledger.Record) error {
	p.entered <- struct{}{}
	<-p.release
	return p.Recorder.Record(ctx, r)
}

// TestDenyHoldsForRequestsInFlight: a request that passed the deny check
// before an administrator denied its identity on this replica is refused
// too, and the deny does not return while such a request is still on its
// way to a certificate.
func TestDenyHoldsForRequestsInFlight(t *testing.T) {
	rec := &pausingRecorder{entered: make(chan struct{}), release: make(chan struct{})}
	e := newEnv(t, envOptions{ledger: rec})
	rec.Recorder = e.ledger
	reqErr := make(chan error, 1)
	go func() {
		_, err := e.call(e.token(t, "demo", "web"), &pb.IstioCertificateRequest{Csr: csrFor(t, testKey(), nil)})
		reqErr <- err
	}()
	<-rec.entered // past the deny check, signed, recording
	denied := make(chan struct{})
	go func() {
		e.denied.Deny(ledger.Denial{SPIFFEID: webID.String(), Reason: "INC-3", By: "admin", At: time.Now()})
		close(denied)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !e.denied.Denied(webID.String()) {
		if time.Now().After(deadline) {
			t.Fatal("the deny was not applied")
		}
		time.Sleep(time.Millisecond) // poll interval
	}
	select {
	case <-denied:
		t.Fatal("the deny returned while a request past its check was still recording")
	default:
	}
	close(rec.release)
	if err := <-reqErr; status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the request in flight: %v, want PermissionDenied", err)
	}
	<-denied
}
