// Package clustere2e installs meshid with its Helm chart on the real
// single-node cluster of hack/cluster.sh (a kubelet on containerd) and
// checks what a platform engineer would: the pods become Ready under Pod
// Security, workloads get certificates through meshid-agent with tokens the
// kubelet projects, Istio's own agent gets one from meshid-ca, identities
// cannot be taken over, meshidctl answers, and the leader's death costs no
// workload its certificate.
//
// It needs a cluster that is up (MESHID_CLUSTER_DIR, default
// /var/lib/meshid-cluster) and pilot-agent (MESHID_PILOT_AGENT_DIR);
// hack/cluster-test.sh provides both and runs it. Without them it skips
// (MESHID_REQUIRE_CLUSTER=1: fails).
package clustere2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/meshid/meshid/internal/cluster"
	"github.com/meshid/meshid/internal/ociimage"
)

// The images the test loads into the cluster's containerd.
const (
	caImage       = "localhost/meshid/meshid-ca:dev"
	agentImage    = "localhost/meshid/meshid-agent:dev"
	workloadImage = "localhost/meshid/e2e-workload:dev"
	pilotImage    = "localhost/meshid/e2e-pilot-agent:dev"
)

// build is what TestMain prepared: host binaries and image archives.
var build struct {
	dir       string // host binaries: meshidctl
	images    []string
	prepared  time.Duration
	err       error
	pilotDir  string
	clusterOK *cluster.Cluster
}

func TestMain(m *testing.M) {
	os.Exit(prepareAndRun(m))
}

func prepareAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "meshid-cluster-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	build.dir = dir
	c, err := cluster.Open(clusterDir())
	if err != nil {
		build.err = err
		return m.Run()
	}
	build.clusterOK = c
	build.pilotDir = os.Getenv("MESHID_PILOT_AGENT_DIR")
	if build.pilotDir == "" {
		build.err = fmt.Errorf("MESHID_PILOT_AGENT_DIR is not set (hack/pilot-agent.sh builds pilot-agent and prints it)")
		return m.Run()
	}
	begin := time.Now()
	build.err = prepare(dir)
	build.prepared = time.Since(begin)
	return m.Run()
}

func clusterDir() string {
	if d := os.Getenv("MESHID_CLUSTER_DIR"); d != "" {
		return d
	}
	return "/var/lib/meshid-cluster"
}

// prepare builds meshidctl for the host, meshid's images as users build
// them (hack/images), and the test's own images: the go-spiffe workload,
// and Istio's pilot-agent with a stand-in for Envoy.
func prepare(dir string) error {
	root, err := filepath.Abs("../..")
	if err != nil {
		return err
	}
	run := func(cmd *exec.Cmd) error {
		cmd.Dir = root
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s: %w", cmd.Args, err)
		}
		return nil
	}
	imgDir := filepath.Join(dir, "images")
	if err := run(exec.Command("go", "run", "./hack/images", "-o", imgDir, "meshid-ca", "meshid-agent", "meshidctl")); err != nil {
		return err
	}
	static := exec.Command("go", "build", "-trimpath", "-o", dir+"/", "./e2e/cluster/workload", "./hack/pause", "./cmd/meshidctl")
	static.Env = append(os.Environ(), "CGO_ENABLED=0")
	if err := run(static); err != nil {
		return err
	}
	read := func(path string) []byte {
		data, rerr := os.ReadFile(path)
		if rerr != nil && err == nil {
			err = rerr
		}
		return data
	}
	created := time.Unix(0, 0)
	workload, err := ociimage.Build(ociimage.Spec{
		Files:      []ociimage.File{{Path: "/usr/local/bin/workload", Mode: 0o755, Data: read(filepath.Join(dir, "workload"))}},
		Entrypoint: []string{"/usr/local/bin/workload"},
		User:       "65532:65532",
		Created:    created,
		Arch:       runtime.GOARCH,
	})
	if err != nil {
		return err
	}
	pause := read(filepath.Join(dir, "pause"))
	pilot, err := ociimage.Build(ociimage.Spec{
		Files: []ociimage.File{
			{Path: "/usr/local/bin/pilot-agent", Mode: 0o755, Data: read(filepath.Join(build.pilotDir, "pilot-agent"))},
			{Path: "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json", Mode: 0o644, Data: read(filepath.Join(build.pilotDir, "envoy_bootstrap_tmpl.json"))},
			// Envoy cannot be had here: pilot-agent starts this, which
			// stays running as Envoy would.
			{Path: "/usr/local/bin/envoy", Mode: 0o755, Data: pause},
			{Path: "/usr/local/bin/pause", Mode: 0o755, Data: pause},
			{Path: "/usr/local/bin/meshidctl", Mode: 0o755, Data: read(filepath.Join(dir, "meshidctl"))},
		},
		Entrypoint: []string{"/usr/local/bin/pilot-agent"},
		User:       "1337:1337",
		Created:    created,
		Arch:       runtime.GOARCH,
	})
	if err != nil {
		return err
	}
	for ref, img := range map[string]v1.Image{workloadImage: workload, pilotImage: pilot} {
		file := filepath.Join(imgDir, filepath.Base(ref)+".tar")
		if err := ociimage.WriteArchive(file, ref, img, created); err != nil {
			return err
		}
	}
	matches, _ := filepath.Glob(filepath.Join(imgDir, "*.tar"))
	build.images = matches
	return nil
}

// needCluster skips t (fails it with MESHID_REQUIRE_CLUSTER=1) when
// TestMain found no cluster or could not prepare.
func needCluster(t *testing.T) *cluster.Cluster {
	t.Helper()
	if build.clusterOK == nil || build.err != nil {
		msg := fmt.Sprintf("no cluster to install on: %v (hack/cluster-test.sh brings one up and runs this)", build.err)
		if build.clusterOK != nil {
			msg = fmt.Sprintf("preparing the images: %v", build.err)
		}
		if os.Getenv("MESHID_REQUIRE_CLUSTER") == "1" || build.clusterOK != nil {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return build.clusterOK
}
