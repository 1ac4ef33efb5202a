package hsmtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// RequireEnv, set to 1, makes a missing SoftHSM2 a failure instead of a
// skip.
const RequireEnv = "MESHID_REQUIRE_HSM"

// ModuleEnv overrides the PKCS#11 module SoftHSM2 is loaded from.
const ModuleEnv = "MESHID_SOFTHSM2_MODULE"

// modules are where Debian and other distributions put SoftHSM2's module.
var modules = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib64/pkcs11/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// Token is an initialised SoftHSM2 token with a user PIN.
type Token struct {
	Module string // path of libsofthsm2.so
	Label  string
	PIN    string
	// URI opens the token with go.step.sm/crypto/kms:
	// pkcs11:module-path=...;token=...?pin-value=...
	URI string
}

// KeyURI names a key object on the token for CreateKey/CreateSigner, by
// CKA_ID (hex) and CKA_LABEL.
func (tok *Token) KeyURI(id, object string) string {
	return "pkcs11:id=" + id + ";object=" + url.PathEscape(object)
}

// SoftHSM initialises a token labelled label in a directory of t's, and
// points SOFTHSM2_CONF at its configuration for the rest of t (so t cannot
// be parallel). It skips t, or fails it under RequireEnv, without SoftHSM2.
func SoftHSM(t testing.TB, label string) *Token {
	t.Helper()
	module, util := find()
	if module == "" || util == "" {
		msg := "no SoftHSM2 (libsofthsm2.so and softhsm2-util): apt-get install softhsm2"
		if os.Getenv(RequireEnv) == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(
		"directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)), 0o600); err != nil {
		t.Fatal(err)
	}
	// The module reads SOFTHSM2_CONF when the process initialises it.
	t.Setenv("SOFTHSM2_CONF", conf)

	const pin, soPIN = "1234", "5678"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, util, "--init-token", "--free",
		"--label", label, "--pin", pin, "--so-pin", soPIN).CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	return &Token{
		Module: module,
		Label:  label,
		PIN:    pin,
		URI:    "pkcs11:module-path=" + module + ";token=" + url.PathEscape(label) + "?pin-value=" + pin,
	}
}

func find() (module, util string) {
	util, _ = exec.LookPath("softhsm2-util")
	if m := os.Getenv(ModuleEnv); m != "" {
		return m, util
	}
	for _, m := range modules {
		if fi, err := os.Stat(m); err == nil && !fi.IsDir() {
			return m, util
		}
	}
	return "", util
}
