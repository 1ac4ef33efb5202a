package keys

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
)

// Secret keeps the CA in a Kubernetes Secret in the CA's namespace.
type Secret struct {
	Client    corev1client.SecretsGetter
	Namespace string
	Name      string
	// Key is the CA key when it lives in a KMS or HSM; nil: in the Secret.
	Key *External
}

// Load reads the CA from the Secret.
func (s *Secret) Load(ctx context.Context) (*Material, error) {
	got, err := s.Client.Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("keys: reading secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return s.parse(got)
}

// ErrStale says the stored CA changed since it was read (another replica
// renewed it): read it again instead of overwriting it.
var ErrStale = errors.New("keys: the stored CA changed meanwhile")

// Save replaces the CA in the Secret with m (a renewed intermediate, a root
// rotation's next stage) unless anyone has changed it since prev was read
// (ErrStale): the Secret must never swing back to an older CA or stage.
func (s *Secret) Save(ctx context.Context, prev, m *Material) error {
	secrets := s.Client.Secrets(s.Namespace)
	got, err := secrets.Get(ctx, s.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("keys: reading secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	stored, err := s.parse(got)
	if err != nil {
		return err
	}
	if !stored.Equal(prev) {
		return ErrStale
	}
	files, err := m.Files()
	if err != nil {
		return err
	}
	got.Data = files
	// The resourceVersion read above makes the update fail if anyone
	// wrote in between.
	if _, err := secrets.Update(ctx, got, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsConflict(err) {
			return ErrStale
		}
		return fmt.Errorf("keys: updating secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	return nil
}

// LoadOrCreate reads the CA from the Secret, or creates the Secret with the
// CA create makes. Replicas starting together on an empty cluster all try to
// create it; the API server lets one win and the others read back its CA, so
// every replica ends with the same root.
func (s *Secret) LoadOrCreate(ctx context.Context, create func() (*Material, error)) (m *Material, created bool, err error) {
	secrets := s.Client.Secrets(s.Namespace)
	got, err := secrets.Get(ctx, s.Name, metav1.GetOptions{})
	switch {
	case err == nil:
		m, err := s.parse(got)
		return m, false, err
	case !apierrors.IsNotFound(err):
		return nil, false, fmt.Errorf("keys: reading secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	m, err = create()
	if err != nil {
		return nil, false, err
	}
	files, err := m.Files()
	if err != nil {
		return nil, false, err
	}
	_, err = secrets.Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Name:      s.Name,
			Namespace: s.Namespace,
			Labels:    map[string]string{"app.kubernetes.io/managed-by": "meshid"},
		},
		Type: corev1.SecretTypeOpaque,
		Data: files,
	}, metav1.CreateOptions{})
	switch {
	case err == nil:
		return m, true, nil
	case !apierrors.IsAlreadyExists(err):
		return nil, false, fmt.Errorf("keys: creating secret %s/%s: %w", s.Namespace, s.Name, err)
	}
	// Another replica won the race: use its CA, drop ours.
	got, err = secrets.Get(ctx, s.Name, metav1.GetOptions{})
	if err != nil {
		return nil, false, fmt.Errorf("keys: reading secret %s/%s after losing the create race: %w", s.Namespace, s.Name, err)
	}
	m, err = s.parse(got)
	return m, false, err
}

func (s *Secret) parse(sec *corev1.Secret) (*Material, error) {
	m, err := ParseFilesWithKey(sec.Data, s.Key)
	if err != nil {
		return nil, fmt.Errorf("%w (in secret %s/%s)", err, s.Namespace, s.Name)
	}
	return m, nil
}
