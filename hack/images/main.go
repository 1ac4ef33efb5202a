// Command images builds meshid's container images from this checkout and
// writes each as an image archive (hack/images.sh runs it):
//
//	go run ./hack/images [-o dist/images] [-arch amd64] [IMAGE...]
//
// IMAGE is meshid-ca, meshid-agent or meshidctl (the default: all three), or
// pause, the sandbox image of hack/cluster.sh. Binaries are built static
// (CGO_ENABLED=0, -trimpath) and put on an empty base; the files' times and
// the image's are the commit's, so the same commit builds the same digests.
// No Docker daemon and no registry are used. Load an archive with
// `docker load -i`, `ctr images import` or `kind load image-archive`.
//
// Each archive names its image <prefix>/<name>:<tag>, by default
// localhost/meshid/<name>:<the chart's appVersion>: the chart's default
// images. What was written is printed on stdout, one line per image:
//
//	<archive> <reference> <manifest digest>
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/meshid/meshid/internal/ociimage"
)

// nonRoot is the user and group of the images meant to run as non-root
// (distroless's "nonroot"); the chart's pods set the same IDs.
const nonRoot = "65532:65532"

type image struct {
	binaries []string // packages of this module, installed as /usr/local/bin/<base>
	user     string
	// entrypoint is the first binary unless set.
	entrypoint []string
	desc       string
}

var images = map[string]image{
	"meshid-ca": {
		// meshidctl beside it: `kubectl exec deploy/meshid-ca -- meshidctl …`.
		binaries: []string{"./cmd/meshid-ca", "./cmd/meshidctl"},
		user:     nonRoot,
		desc:     "meshid-ca: certificate authority for Kubernetes service meshes (Istio's CreateCertificate, SPIFFE X.509)",
	},
	"meshid-agent": {
		binaries: []string{"./cmd/meshid-agent"},
		// The chart runs the node agent as root (its hostPath socket); a
		// sidecar runs it as this user.
		user: nonRoot,
		desc: "meshid-agent: per-node or per-pod agent serving SPIFFE certificates over Envoy SDS and the Workload API",
	},
	"meshidctl": {
		binaries: []string{"./cmd/meshidctl"},
		user:     nonRoot,
		desc:     "meshidctl: audit meshid's identities and certificates",
	},
	"pause": {
		binaries: []string{"./hack/pause"},
		user:     "65535:65535",
		desc:     "sandbox (pause) container for hack/cluster.sh",
	},
}

var defaultImages = []string{"meshid-ca", "meshid-agent", "meshidctl"}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run() error {
	out := flag.String("o", filepath.Join("dist", "images"), "directory the archives are written to")
	arch := flag.String("arch", runtime.GOARCH, "GOARCH of the images")
	prefix := flag.String("prefix", "localhost/meshid", "repository prefix of the image names")
	tag := flag.String("tag", "", "image tag (default: the chart's appVersion)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./hack/images [flags] [%s]\n", strings.Join(append(defaultImages, "pause"), "|"))
		flag.PrintDefaults()
	}
	flag.Parse()
	names := flag.Args()
	if len(names) == 0 {
		names = defaultImages
	}
	for _, n := range names {
		if _, ok := images[n]; !ok {
			return fmt.Errorf("no image %q (want one of meshid-ca, meshid-agent, meshidctl, pause)", n)
		}
	}
	appVersion, err := chartAppVersion(filepath.Join("deploy", "charts", "meshid", "Chart.yaml"))
	if err != nil {
		return err
	}
	if *tag == "" {
		*tag = appVersion
	}
	src, err := source()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	binDir, err := os.MkdirTemp("", "meshid-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(binDir)

	var pkgs []string
	seen := map[string]bool{}
	for _, n := range names {
		for _, p := range images[n].binaries {
			if !seen[p] {
				seen[p] = true
				pkgs = append(pkgs, p)
			}
		}
	}
	if err := build(binDir, *arch, appVersion, src.revision, pkgs); err != nil {
		return err
	}

	for _, n := range names {
		def := images[n]
		var files []ociimage.File
		for _, p := range def.binaries {
			data, err := os.ReadFile(filepath.Join(binDir, filepath.Base(p)))
			if err != nil {
				return err
			}
			files = append(files, ociimage.File{Path: "/usr/local/bin/" + filepath.Base(p), Mode: 0o755, Data: data})
		}
		entrypoint := def.entrypoint
		if entrypoint == nil {
			entrypoint = []string{"/usr/local/bin/" + filepath.Base(def.binaries[0])}
		}
		version := appVersion
		if n == "pause" {
			version = "meshid-" + appVersion
		}
		img, err := ociimage.Build(ociimage.Spec{
			Files:      files,
			Entrypoint: entrypoint,
			User:       def.user,
			Created:    src.time,
			Arch:       *arch,
			Labels: map[string]string{
				"org.opencontainers.image.title":       n,
				"org.opencontainers.image.description": def.desc,
				"org.opencontainers.image.version":     version,
				"org.opencontainers.image.revision":    src.revision,
				"org.opencontainers.image.created":     src.time.UTC().Format(time.RFC3339),
				"org.opencontainers.image.source":      "https://github.com/meshid/meshid",
			},
		})
		if err != nil {
			return fmt.Errorf("%s: %w", n, err)
		}
		ref := *prefix + "/" + n + ":" + *tag
		archive := filepath.Join(*out, n+".tar")
		if err := ociimage.WriteArchive(archive, ref, img, src.time); err != nil {
			return err
		}
		digest, err := img.Digest()
		if err != nil {
			return err
		}
		fmt.Printf("%s %s %s\n", archive, ref, digest)
	}
	if src.dirty {
		fmt.Fprintln(os.Stderr, "images: the work tree has uncommitted changes: the images are labelled", src.revision, "and another build of this commit may differ")
	}
	return nil
}

// build compiles pkgs as static linux binaries into dir.
func build(dir, arch, appVersion, revision string, pkgs []string) error {
	ldflags := fmt.Sprintf("-s -w -X github.com/meshid/meshid/internal/version.Version=%s -X github.com/meshid/meshid/internal/version.Commit=%s", appVersion, revision)
	args := append([]string{"build", "-trimpath", "-buildvcs=false", "-ldflags=" + ldflags, "-o", dir + string(filepath.Separator)}, pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch, "GOFLAGS=")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	fmt.Fprintf(os.Stderr, "images: building %s for linux/%s\n", strings.Join(pkgs, " "), arch)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	return nil
}

type sourceInfo struct {
	revision string
	dirty    bool
	time     time.Time
}

// source is the commit being built and its time; SOURCE_DATE_EPOCH, when
// set, overrides the time (reproducible-builds.org's variable). Outside a
// git checkout the revision is "unknown" and the time SOURCE_DATE_EPOCH or
// the Unix epoch.
func source() (sourceInfo, error) {
	s := sourceInfo{revision: "unknown", time: time.Unix(0, 0).UTC()}
	if rev, err := git("rev-parse", "HEAD"); err == nil {
		s.revision = rev
		if status, err := git("status", "--porcelain", "--untracked-files=no"); err == nil && status != "" {
			s.dirty = true
			s.revision += "-dirty"
		}
		if ct, err := git("log", "-1", "--format=%ct"); err == nil {
			if sec, err := strconv.ParseInt(ct, 10, 64); err == nil {
				s.time = time.Unix(sec, 0).UTC()
			}
		}
	}
	if v := os.Getenv("SOURCE_DATE_EPOCH"); v != "" {
		sec, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return s, fmt.Errorf("SOURCE_DATE_EPOCH=%q is not a number of seconds", v)
		}
		s.time = time.Unix(sec, 0).UTC()
	}
	return s, nil
}

func git(args ...string) (string, error) {
	out, err := exec.Command("git", args...).Output()
	return strings.TrimSpace(string(out)), err
}

func chartAppVersion(file string) (string, error) {
	data, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%s not found: run from the repository's root", file)
	}
	if err != nil {
		return "", err
	}
	var c struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(data, &c); err != nil {
		return "", fmt.Errorf("%s: %w", file, err)
	}
	if c.AppVersion == "" {
		return "", fmt.Errorf("%s has no appVersion", file)
	}
	return c.AppVersion, nil
}
