package jwtsvid

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/meshid/meshid/internal/atomicfile"
)

// Store keeps the key set where every replica finds it.
type Store interface {
	// Load returns what is stored and a version to save against; no
	// data and no error: nothing is stored yet.
	Load(ctx context.Context) (data []byte, version string, err error)
	// Save stores data unless the store changed since version was read
	// (ErrStale); version "" creates it.
	Save(ctx context.Context, version string, data []byte) error
}

// ErrStale says another replica changed the stored set since it was read.
var ErrStale = errors.New("jwtsvid: the stored key set changed meanwhile")

// SecretKey is the key of the set in its Secret.
const SecretKey = "jwt-keys.json"

// Secret keeps the set in a Kubernetes Secret, shared by the replicas.
type Secret struct {
	Client    corev1client.SecretsGetter
	Namespace string
	Name      string
}

func (s *Secret) Load(ctx context.Context) ([]byte, string, error) {
	got, err := s.Client.Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, "", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("jwtsvid: reading secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	data, ok := got.Data[SecretKey]
	if !ok {
		return nil, "", fmt.Errorf("jwtsvid: secret %s/%s has no %s", s.Namespace, s.Name, SecretKey)
	}
	return data, got.ResourceVersion, nil
}

func (s *Secret) Save(ctx context.Context, version string, data []byte) error {
	secrets := s.Client.Secrets(s.Namespace)
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, ResourceVersion: version,
			Labels: map[string]string{"app.kubernetes.io/managed-by": "meshid-ca"}},
		Type: corev1.SecretTypeOpaque,
		Data: map[string][]byte{SecretKey: data},
	}
	var err error
	if version == "" {
		_, err = secrets.Create(ctx, sec, metav1.CreateOptions{})
	} else {
		// The resourceVersion makes the update fail if anyone wrote since.
		_, err = secrets.Update(ctx, sec, metav1.UpdateOptions{})
	}
	switch {
	case apierrors.IsAlreadyExists(err), apierrors.IsConflict(err):
		return ErrStale
	case err != nil:
		return fmt.Errorf("jwtsvid: writing secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

// File keeps the set in a file (mode 0600) of a state directory that one
// meshid-ca holds.
type File struct {
	Path string
}

func (f *File) Load(context.Context) ([]byte, string, error) {
	data, err := os.ReadFile(f.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("jwtsvid: %w", err)
	}
	return data, digest(data), nil
}

func (f *File) Save(ctx context.Context, version string, data []byte) error {
	cur, curVersion, err := f.Load(ctx)
	if err != nil {
		return err
	}
	if curVersion != version || (version == "" && cur != nil) {
		return ErrStale
	}
	return atomicfile.Write(f.Path, data, 0o600)
}

func digest(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}
