package admin

import (
	"context"
	"crypto/x509"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshid/meshid/ca/admin/adminpb"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/ca/rotation"
)

// rotator is nil for a plug-in CA, whose root is rotated by replacing its
// files.
func (s *Server) rotator() (*rotation.Rotator, error) {
	if s.cfg.Rotator == nil {
		return nil, status.Errorf(codes.FailedPrecondition,
			"root rotation needs a CA meshid generated (--ca-source dir or secret); this CA is %s: replace its files in stages instead (see deploy/README.md)", s.cfg.CASource)
	}
	return s.cfg.Rotator, nil
}

func parseStage(raw string) (keys.Stage, error) {
	switch s := keys.Stage(raw); s {
	case keys.StageNone, keys.StagePrepared, keys.StageDistributed, keys.StageSwitched:
		return s, nil
	}
	return "", status.Errorf(codes.InvalidArgument, "from_stage %q: want none, prepared, distributed or switched", raw)
}

// rotationError maps a refused step to a gRPC status whose message is safe
// to show: stages and checks, never key material.
func (s *Server) rotationError(err error) error {
	var ce *rotation.ChecksError
	switch {
	case errors.As(err, &ce):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, rotation.ErrStageChanged), errors.Is(err, keys.ErrStage):
		return status.Error(codes.Aborted, err.Error())
	}
	s.cfg.Log.Error("admin: root rotation failed", "error", err)
	return status.Error(codes.Unavailable, "root rotation failed (see meshid-ca's log): "+err.Error())
}

func (s *Server) GetRootRotation(ctx context.Context, _ *adminpb.GetRootRotationRequest) (*adminpb.RootRotation, error) {
	r, err := s.rotator()
	if err != nil {
		return nil, err
	}
	st, err := r.Status(ctx)
	if err != nil {
		return nil, s.rotationError(err)
	}
	return rotationPB(st), nil
}

func (s *Server) AdvanceRootRotation(ctx context.Context, req *adminpb.AdvanceRootRotationRequest) (*adminpb.RootRotation, error) {
	return s.step(req.GetFromStage(), func(r *rotation.Rotator, from keys.Stage) (*rotation.Status, error) {
		return r.Advance(ctx, from, req.GetForce(), actor(ctx))
	})
}

func (s *Server) AbortRootRotation(ctx context.Context, req *adminpb.AbortRootRotationRequest) (*adminpb.RootRotation, error) {
	return s.step(req.GetFromStage(), func(r *rotation.Rotator, from keys.Stage) (*rotation.Status, error) {
		return r.Abort(ctx, from, actor(ctx))
	})
}

// step checks the request's stage and runs one change of the rotation.
func (s *Server) step(fromStage string, do func(*rotation.Rotator, keys.Stage) (*rotation.Status, error)) (*adminpb.RootRotation, error) {
	r, err := s.rotator()
	if err != nil {
		return nil, err
	}
	from, err := parseStage(fromStage)
	if err != nil {
		return nil, err
	}
	st, err := do(r, from)
	if err != nil {
		return nil, s.rotationError(err)
	}
	return rotationPB(st), nil
}

func rotationPB(st *rotation.Status) *adminpb.RootRotation {
	pb := &adminpb.RootRotation{
		Stage:         string(st.Stage),
		NextStep:      string(st.Next),
		StartedAt:     timestamp(st.StartedAt),
		DistributedAt: timestamp(st.DistributedAt),
		SwitchedAt:    timestamp(st.SwitchedAt),
		Roots:         caCertificatesPB(st.Roots),
		OldRoots:      caCertificatesPB(st.OldRoots),
	}
	if st.SigningRoot != nil {
		pb.SigningRoot = caCertificatePB(st.SigningRoot)
	}
	if st.NextRoot != nil {
		pb.NextRoot = caCertificatePB(st.NextRoot)
	}
	for _, c := range st.Checks {
		pb.Checks = append(pb.Checks, &adminpb.RotationCheck{Name: c.Name, Passed: c.Passed, Detail: c.Detail, ExpectedAt: timestamp(c.At)})
	}
	return pb
}

func caCertificatesPB(cs []*x509.Certificate) []*adminpb.CACertificate {
	var out []*adminpb.CACertificate
	for _, c := range cs {
		out = append(out, caCertificatePB(c))
	}
	return out
}
