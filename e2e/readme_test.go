package e2e

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestReadmeIsTrue keeps the documentation honest where a machine can tell:
// every flag it names is one a meshid binary has, every file and script it
// points to exists, and every fuzz target is listed.
func TestReadmeIsTrue(t *testing.T) {
	docs := []string{"../README.md", "../SECURITY.md", "../docs/design.md", "../docs/performance.md", "../deploy/README.md", "../deploy/istio.md", "../docs/cluster.md", "../docs/faults.md"}
	text := map[string]string{}
	for _, d := range docs {
		b, err := os.ReadFile(d)
		if err != nil {
			t.Fatal(err)
		}
		text[d] = string(b)
	}

	t.Run("flags", func(t *testing.T) {
		ours := binaryFlags(t)
		// and the hack/ scripts' own options, as their case arms name them.
		scripts, _ := filepath.Glob("../hack/*.sh")
		armRE := regexp.MustCompile(`(?m)^\s*(--[a-z][a-z0-9-]+)(?:\s*\|[^)]*)?\)`)
		for _, sc := range scripts {
			b, err := os.ReadFile(sc)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range armRE.FindAllStringSubmatch(string(b), -1) {
				ours[m[1]] = true
			}
		}
		// Flags of other programs the documents show: kubectl, go test,
		// hyperfine, istioctl, the flood tools' environment, kube-apiserver.
		others := []string{"--audience", "--warmup", "--runs", "--help", "--context", "--name", "--runtime-config"}
		flagRE := regexp.MustCompile("`[^`]*`")
		nameRE := regexp.MustCompile(`(?:^|[\s\[(|=])(--[a-z][a-z0-9-]+)`)
		checked := 0
		for _, d := range []string{"../README.md", "../SECURITY.md", "../docs/design.md"} {
			for _, code := range flagRE.FindAllString(text[d], -1) {
				code = strings.Trim(code, "`")
				for _, m := range nameRE.FindAllStringSubmatch(code, -1) {
					checked++
					if f := m[1]; !ours[f] && !slices.Contains(others, f) {
						t.Errorf("%s names %s, which no meshid binary has (in %s)", filepath.Base(d), f, code)
					}
				}
			}
		}
		if checked < 100 {
			t.Errorf("checked only %d flags named in the documents", checked)
		}
	})

	t.Run("links and scripts", func(t *testing.T) {
		linkRE := regexp.MustCompile(`\]\(([^)#\s]+)(#[^)]*)?\)`)
		scriptRE := regexp.MustCompile(`\bhack/[a-z0-9-]+\.sh\b`)
		for d, s := range text {
			for _, m := range linkRE.FindAllStringSubmatch(s, -1) {
				if strings.Contains(m[1], "://") {
					continue
				}
				if _, err := os.Stat(filepath.Join(filepath.Dir(d), m[1])); err != nil {
					t.Errorf("%s links %s: %v", d, m[1], err)
				}
			}
			for _, sc := range scriptRE.FindAllString(s, -1) {
				fi, err := os.Stat(filepath.Join("..", sc))
				if err != nil || fi.Mode()&0o111 == 0 {
					t.Errorf("%s names %s, which is not an executable script here", d, sc)
				}
			}
		}
	})

	t.Run("fuzz targets", func(t *testing.T) {
		fuzzRE := regexp.MustCompile(`(?m)^func (Fuzz[A-Za-z0-9_]+)\(f \*testing\.F\)`)
		filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, "_test.go") {
				return err
			}
			b, _ := os.ReadFile(path)
			for _, m := range fuzzRE.FindAllStringSubmatch(string(b), -1) {
				if !strings.Contains(text["../README.md"], "`"+m[1]+"`") {
					t.Errorf("fuzz target %s (%s) is not in the README's list", m[1], path)
				}
			}
			return nil
		})
	})
}

// binaryFlags is every long flag of meshid's binaries and of meshidctl's
// commands, as their --help says.
func binaryFlags(t *testing.T) map[string]bool {
	t.Helper()
	flags := map[string]bool{}
	longRE := regexp.MustCompile(`(?m)^\s+(?:-[a-zA-Z], )?(--[a-z][a-z0-9-]+)`)
	help := func(bin string, args ...string) string {
		out, _ := exec.Command(filepath.Join(binDir, bin), append(args, "--help")...).CombinedOutput()
		return string(out)
	}
	add := func(out string) {
		for _, m := range longRE.FindAllStringSubmatch(out, -1) {
			flags[m[1]] = true
		}
	}
	for _, bin := range []string{"meshid-ca", "meshid-agent"} {
		add(help(bin))
	}
	// meshid-demo uses Go's flag package: -name, listed one per line.
	for _, line := range strings.Split(help("meshid-demo"), "\n") {
		if f, ok := strings.CutPrefix(strings.TrimSpace(line), "-"); ok && f != "" {
			flags["--"+strings.Fields(f)[0]] = true
		}
	}
	// meshidctl: every command and subcommand.
	var walk func(path ...string)
	walk = func(path ...string) {
		out := help("meshidctl", path...)
		add(out)
		sc := bufio.NewScanner(bytes.NewBufferString(out))
		in := false
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "Available Commands:"):
				in = true
			case in && strings.TrimSpace(line) == "":
				in = false
			case in:
				if name := strings.Fields(line)[0]; name != "help" && name != "completion" {
					walk(append(slices.Clone(path), name)...)
				}
			}
		}
	}
	walk()
	if len(flags) < 50 {
		t.Fatalf("found only %d flags in the binaries' help: %v", len(flags), flags)
	}
	return flags
}
