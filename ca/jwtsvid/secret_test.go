package jwtsvid_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/ca/jwtsvid"
	"github.com/meshid/meshid/internal/kubetest"
)

// Replicas starting together on a real API server create the Secret once
// and sign with one key; a write over a newer Secret is refused.
func TestSecretSharedByReplicas(t *testing.T) {
	c := kubetest.Start(t)
	store := func() jwtsvid.Store {
		return &jwtsvid.Secret{Client: c.Client.CoreV1(), Namespace: "default", Name: "meshid-ca-jwt-keys"}
	}
	clk := &clock{t: time.Now()}
	replicas := make([]*jwtsvid.Keys, 3)
	errs := make([]error, len(replicas))
	var wg sync.WaitGroup
	for i := range replicas {
		replicas[i] = newKeys(t, store(), clk)
		wg.Go(func() { errs[i] = replicas[i].Sync(context.Background()) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	for i, r := range replicas {
		if r.Active().ID != replicas[0].Active().ID {
			t.Errorf("replica %d signs with %s, replica 0 with %s", i, r.Active().ID, replicas[0].Active().ID)
		}
	}
	sec, err := c.Client.CoreV1().Secrets("default").Get(context.Background(), "meshid-ca-jwt-keys", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sec.Labels["app.kubernetes.io/managed-by"] != "meshid-ca" || len(sec.Data[jwtsvid.SecretKey]) == 0 {
		t.Errorf("the Secret: labels %v, keys %d bytes", sec.Labels, len(sec.Data[jwtsvid.SecretKey]))
	}

	// Half a rotation later one replica makes the successor; the others
	// read it instead of making their own.
	clk.Add(policy.Rotation / 2)
	for i, r := range replicas {
		if err := r.Sync(context.Background()); err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	for i, r := range replicas {
		if len(r.Published()) != 2 {
			t.Errorf("replica %d publishes %d keys, want the active one and one successor", i, len(r.Published()))
		}
	}

	s := store()
	_, version, err := s.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(context.Background(), version, []byte(`{"keys":[]}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.Save(context.Background(), version, []byte(`{"keys":[]}`)); !errors.Is(err, jwtsvid.ErrStale) {
		t.Errorf("a save over a newer Secret: %v, want ErrStale", err)
	}
	if err := s.Save(context.Background(), "", []byte(`{"keys":[]}`)); !errors.Is(err, jwtsvid.ErrStale) {
		t.Errorf("creating a Secret that exists: %v, want ErrStale", err)
	}
}
