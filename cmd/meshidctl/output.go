package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"
)

// Output formats every command takes with -o.
const (
	formatTable = "table"
	formatJSON  = "json"
	formatYAML  = "yaml"
)

// outputFlag adds -o/--output (table|json|yaml, default table) to cmd and
// returns the value's address. A value that is not one of them is a flag
// error, so it is refused (exit 2) before the command does any work.
func outputFlag(cmd *cobra.Command) *string {
	format := formatTable
	cmd.Flags().VarP(formatValue{&format}, "output", "o", "output format: table, json or yaml")
	return &format
}

// formatValue is the -o flag: a string that accepts only known formats.
type formatValue struct{ p *string }

func (v formatValue) String() string {
	if v.p == nil {
		return ""
	}
	return *v.p
}

func (v formatValue) Set(s string) error {
	if err := checkFormat(s); err != nil {
		return err
	}
	*v.p = s
	return nil
}

func (v formatValue) Type() string { return "format" }

func checkFormat(format string) error {
	switch format {
	case formatTable, formatJSON, formatYAML:
		return nil
	}
	return usageErrorf("unknown output format %q: want table, json or yaml", format)
}

// render writes data as JSON (2-space indent, trailing newline), YAML
// (converted from the JSON, so field names are the json tags), or, for
// "table", by calling table(w).
func render(w io.Writer, format string, data any, table func(w io.Writer) error) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	if format == formatTable {
		return table(w)
	}
	b, err := json.MarshalIndent(data, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding output: %w", err)
	}
	if format == formatYAML {
		if b, err = yaml.JSONToYAML(b); err != nil {
			return fmt.Errorf("encoding output: %w", err)
		}
	} else {
		b = append(b, '\n')
	}
	_, err = w.Write(b)
	return err
}

// newTable returns a tabwriter for kubectl-style columns and writes the
// headers, upper-cased. Write rows as tab-separated cells ending in "\n",
// then call Flush.
func newTable(w io.Writer, headers ...string) *tabwriter.Writer {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	upper := make([]string, len(headers))
	for i, h := range headers {
		upper[i] = strings.ToUpper(h)
	}
	fmt.Fprintln(tw, strings.Join(upper, "\t"))
	return tw
}

// humanDuration renders a duration the way kubectl renders ages: "45s",
// "12m", "5h3m", "3d4h", "2y". A negative duration is the same with a "-"
// in front ("-5m": five minutes ago).
func humanDuration(d time.Duration) string {
	if d < 0 {
		if d == time.Duration(-1<<63) {
			d++ // -d would overflow
		}
		return "-" + humanDuration(-d)
	}
	// kubectl's k8s.io/apimachinery/pkg/util/duration.HumanDuration.
	seconds := int64(d / time.Second)
	if seconds < 60*2 {
		return fmt.Sprintf("%ds", seconds)
	}
	minutes := int64(d / time.Minute)
	if minutes < 10 {
		if s := seconds % 60; s != 0 {
			return fmt.Sprintf("%dm%ds", minutes, s)
		}
		return fmt.Sprintf("%dm", minutes)
	}
	if minutes < 60*3 {
		return fmt.Sprintf("%dm", minutes)
	}
	hours := int64(d / time.Hour)
	switch {
	case hours < 8:
		if m := minutes % 60; m != 0 {
			return fmt.Sprintf("%dh%dm", hours, m)
		}
		return fmt.Sprintf("%dh", hours)
	case hours < 48:
		return fmt.Sprintf("%dh", hours)
	case hours < 24*8:
		if h := hours % 24; h != 0 {
			return fmt.Sprintf("%dd%dh", hours/24, h)
		}
		return fmt.Sprintf("%dd", hours/24)
	case hours < 24*365*2:
		return fmt.Sprintf("%dd", hours/24)
	case hours < 24*365*8:
		if dy := (hours / 24) % 365; dy != 0 {
			return fmt.Sprintf("%dy%dd", hours/24/365, dy)
		}
		return fmt.Sprintf("%dy", hours/24/365)
	}
	return fmt.Sprintf("%dy", hours/24/365)
}

// timeLeft renders how long from now until until, as humanDuration, or
// "expired 5m ago" when until is not after now. A zero until is "-".
func timeLeft(until, now time.Time) string {
	if until.IsZero() {
		return "-"
	}
	left := until.Sub(now)
	if left <= 0 {
		return "expired " + humanDuration(-left) + " ago"
	}
	return humanDuration(left)
}

// timestamp renders t for tables and reports: RFC 3339 in UTC, "-" if zero.
func timestamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
