package ca

import (
	"errors"
	"fmt"
)

// ErrNoIssuer is returned while no signing key is loaded.
var ErrNoIssuer = errors.New("ca: no issuer loaded")

// ErrInvalidRequest marks a request the authority refuses to sign.
var ErrInvalidRequest = errors.New("ca: invalid request")

// ErrBadCertificate marks a signed certificate that failed re-validation.
// It means a bug or a misbehaving signer, never bad input.
var ErrBadCertificate = errors.New("ca: issued certificate failed validation")

func errorf(format string, args ...any) error {
	return fmt.Errorf("ca: "+format, args...)
}
