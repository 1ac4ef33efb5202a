package distribute

import (
	"context"
	"log/slog"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Leader runs singleton work on one replica at a time, holding a Lease.
type Leader struct {
	Client    kubernetes.Interface
	Namespace string
	Lease     string // the Lease's name
	Identity  string // this replica (its pod name)
	Log       *slog.Logger
	// OnChange, if set, hears whether this replica leads (for metrics).
	OnChange func(leading bool)
}

// Run runs work while this replica holds the Lease, stopping it (through
// its context) when the Lease is lost, and tries again until ctx ends. A
// replica that stops cleanly gives the Lease up at once, so another takes
// over without waiting for it to expire.
func (l *Leader) Run(ctx context.Context, work func(context.Context)) {
	log := l.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: l.Namespace, Name: l.Lease},
		Client:     l.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: l.Identity},
	}
	for ctx.Err() == nil {
		elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   15 * time.Second,
			RenewDeadline:   10 * time.Second,
			RetryPeriod:     2 * time.Second,
			ReleaseOnCancel: true,
			Name:            l.Lease,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					log.Info("leading: running singleton work", "lease", l.Lease, "identity", l.Identity)
					if l.OnChange != nil {
						l.OnChange(true)
					}
					work(ctx)
				},
				OnStoppedLeading: func() {
					log.Info("not leading", "lease", l.Lease, "identity", l.Identity)
					if l.OnChange != nil {
						l.OnChange(false)
					}
				},
			},
		})
		if err != nil {
			log.Error("leader election misconfigured", "error", err)
			return
		}
		elector.Run(ctx) // returns when leadership is lost or ctx ends
	}
}
