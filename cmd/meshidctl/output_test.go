package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

// update rewrites the golden files: go test ./cmd/meshidctl -update.
var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to write it)", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (go test -update rewrites it):\n%s\nwant:\n%s", path, got, want)
	}
}

func TestHumanDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{500 * time.Millisecond, "0s"},
		{45 * time.Second, "45s"},
		{119 * time.Second, "119s"},
		{2 * time.Minute, "2m"},
		{5*time.Minute + 30*time.Second, "5m30s"},
		{12*time.Minute + 59*time.Second, "12m"},
		{179 * time.Minute, "179m"},
		{3 * time.Hour, "3h"},
		{5*time.Hour + 3*time.Minute, "5h3m"},
		{8*time.Hour + 59*time.Minute, "8h"},
		{47 * time.Hour, "47h"},
		{3*24*time.Hour + 4*time.Hour, "3d4h"},
		{7 * 24 * time.Hour, "7d"},
		{400 * 24 * time.Hour, "400d"},
		{2 * 365 * 24 * time.Hour, "2y"},
		{3*365*24*time.Hour + 10*24*time.Hour, "3y10d"},
		{10 * 365 * 24 * time.Hour, "10y"},
		{-5 * time.Minute, "-5m"},
		{-45 * time.Second, "-45s"},
		{time.Duration(-1 << 63), "-292y"},
	} {
		if got := humanDuration(tc.d); got != tc.want {
			t.Errorf("humanDuration(%s) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestTimeLeft(t *testing.T) {
	now := epoch
	for _, tc := range []struct {
		until time.Time
		want  string
	}{
		{now.Add(5*time.Hour + 3*time.Minute), "5h3m"},
		{now.Add(30 * time.Second), "30s"},
		{now, "expired 0s ago"},
		{now.Add(-5 * time.Minute), "expired 5m ago"},
		{now.Add(-50 * time.Hour), "expired 2d2h ago"},
		{time.Time{}, "-"},
	} {
		if got := timeLeft(tc.until, now); got != tc.want {
			t.Errorf("timeLeft(now%+v) = %q, want %q", tc.until.Sub(now), got, tc.want)
		}
	}
}

type sample struct {
	Name     string    `json:"name"`
	SPIFFEID string    `json:"spiffe_id"`
	NotAfter time.Time `json:"not_after"`
	Tags     []string  `json:"tags,omitempty"`
}

func TestRender(t *testing.T) {
	data := []sample{{Name: "web", SPIFFEID: webID, NotAfter: epoch, Tags: []string{"a"}}}
	table := func(w io.Writer) error {
		tw := newTable(w, "name", "spiffe id")
		for _, s := range data {
			fmt.Fprintf(tw, "%s\t%s\n", s.Name, s.SPIFFEID)
		}
		return tw.Flush()
	}
	for _, tc := range []struct{ format, want string }{
		{"table", "NAME  SPIFFE ID\nweb   spiffe://cluster.local/ns/shop/sa/web\n"},
		{"json", `[
  {
    "name": "web",
    "spiffe_id": "spiffe://cluster.local/ns/shop/sa/web",
    "not_after": "2030-01-02T03:04:05Z",
    "tags": [
      "a"
    ]
  }
]
`},
		{"yaml", `- name: web
  not_after: "2030-01-02T03:04:05Z"
  spiffe_id: spiffe://cluster.local/ns/shop/sa/web
  tags:
  - a
`},
	} {
		var b bytes.Buffer
		if err := render(&b, tc.format, data, table); err != nil {
			t.Fatalf("%s: %v", tc.format, err)
		}
		if b.String() != tc.want {
			t.Errorf("%s:\n%s\nwant:\n%s", tc.format, b.String(), tc.want)
		}
	}
	err := render(io.Discard, "wide", data, table)
	if exitCode(err) != exitUsage || err.Error() != `unknown output format "wide": want table, json or yaml` {
		t.Errorf("unknown format: %v (exit %d)", err, exitCode(err))
	}
	boom := errors.New("boom")
	if err := render(io.Discard, "table", data, func(io.Writer) error { return boom }); err != boom {
		t.Errorf("the table's error is lost: %v", err)
	}
}

func TestOutputFlag(t *testing.T) {
	var got string
	newCmd := func() *cobra.Command {
		cmd := &cobra.Command{Use: "x", SilenceUsage: true, SilenceErrors: true}
		cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &exitError{code: exitUsage, err: err} })
		format := outputFlag(cmd)
		cmd.RunE = func(*cobra.Command, []string) error { got = *format; return nil }
		cmd.SetOut(io.Discard)
		return cmd
	}
	for args, want := range map[string]string{"": "table", "-o json": "json", "--output=yaml": "yaml", "-o table": "table"} {
		cmd := newCmd()
		cmd.SetArgs(strings.Fields(args))
		if err := cmd.Execute(); err != nil || got != want {
			t.Errorf("%q: format %q, error %v; want %q", args, got, err, want)
		}
	}
	cmd := newCmd()
	cmd.SetArgs([]string{"-o", "xml"})
	err := cmd.Execute()
	if exitCode(err) != exitUsage || !strings.Contains(err.Error(), `unknown output format "xml": want table, json or yaml`) {
		t.Errorf("-o xml: %v (exit %d)", err, exitCode(err))
	}
	if f := newCmd().Flags().Lookup("output"); f.Shorthand != "o" || f.DefValue != "table" {
		t.Errorf("flag -%s default %q", f.Shorthand, f.DefValue)
	}
}
