// Command meshidctl audits meshid's identities and certificates: who holds
// which identity, since when, until when, and how to cut one off.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// Exit codes, stable for scripts.
const (
	exitOK       = 0
	exitFailed   = 1 // the operation failed, or a check did
	exitUsage    = 2 // bad flags, arguments or input
	exitNotFound = 3 // what was asked for does not exist
)

// exitError carries the exit code an error should end meshidctl with.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// usageErrorf reports bad flags, arguments or input (exit 2).
func usageErrorf(format string, args ...any) error {
	return &exitError{code: exitUsage, err: fmt.Errorf(format, args...)}
}

// notFoundErrorf reports that what was asked for does not exist (exit 3).
func notFoundErrorf(format string, args ...any) error {
	return &exitError{code: exitNotFound, err: fmt.Errorf(format, args...)}
}

// exitCode maps an error from a command to meshidctl's exit code.
func exitCode(err error) int {
	var e *exitError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &e):
		return e.code
	}
	return exitFailed
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run executes meshidctl with args; tests call it directly.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRootCommand()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if err != nil && strings.HasPrefix(err.Error(), "unknown command ") {
		// Cobra's own error for a command that does not exist.
		err = &exitError{code: exitUsage, err: err}
	}
	if err != nil {
		fmt.Fprintln(stderr, "meshidctl:", err)
	}
	return exitCode(err)
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "meshidctl",
		Short: "Audit meshid's identities and certificates",
		Long: `meshidctl answers who holds which identity, since when and until when, from
meshid-ca's ledger; decodes certificates; shows what an agent serves; and cuts an
identity off (deny) or lets it back (allow).`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	// Cobra's own flag and argument errors are usage errors.
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error {
		return &exitError{code: exitUsage, err: err}
	})
	root.AddCommand(
		// Each subcommand lives in its own file.
		newIdentitiesCommand(),
		newCertsCommand(),
		newDenyCommand(),
		newAllowCommand(),
		newBundleCommand(),
		newCheckCommand(),
		newInspectCommand(), newSecretsCommand(),
		newRootRotationCommand(),
	)
	argsAreUsage(root)
	return root
}

// argsAreUsage makes the argument checks of cmd and its subcommands
// (cobra.ExactArgs and the like) usage errors, exit 2, like bad flags.
func argsAreUsage(cmd *cobra.Command) {
	if check := cmd.Args; check != nil {
		cmd.Args = func(c *cobra.Command, args []string) error {
			if err := check(c, args); err != nil {
				return &exitError{code: exitUsage, err: err}
			}
			return nil
		}
	}
	for _, sub := range cmd.Commands() {
		argsAreUsage(sub)
	}
}
