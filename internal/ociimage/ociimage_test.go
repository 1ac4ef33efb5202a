package ociimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

var created = time.Date(2026, 11, 30, 3, 16, 0, 0, time.UTC)

func spec() Spec {
	return Spec{
		Files: []File{
			{Path: "/usr/local/bin/tool", Mode: 0o755, Data: []byte("#!binary")},
			{Path: "/etc/tool/config", Mode: 0o644, Data: []byte("a: 1\n")},
		},
		Entrypoint: []string{"/usr/local/bin/tool"},
		User:       "65532:65532",
		Labels:     map[string]string{"org.opencontainers.image.revision": "abc"},
		Created:    created,
		Arch:       "amd64",
	}
}

func TestBuildIsReproducible(t *testing.T) {
	a, err := Build(spec())
	if err != nil {
		t.Fatal(err)
	}
	b, err := Build(spec())
	if err != nil {
		t.Fatal(err)
	}
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Fatalf("same inputs, digests %s and %s", da, db)
	}
	// Any input changes it.
	s := spec()
	s.Files[0].Data = []byte("#!binary2")
	c, err := Build(s)
	if err != nil {
		t.Fatal(err)
	}
	if dc, _ := c.Digest(); dc == da {
		t.Fatal("another file content gave the same digest")
	}
	s = spec()
	s.Created = created.Add(time.Second)
	c, _ = Build(s)
	if dc, _ := c.Digest(); dc == da {
		t.Fatal("another creation time gave the same digest")
	}
}

func TestBuildConfigAndLayer(t *testing.T) {
	img, err := Build(spec())
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "amd64" || cf.Config.User != "65532:65532" || cf.Config.Entrypoint[0] != "/usr/local/bin/tool" || !cf.Created.Time.Equal(created) {
		t.Fatalf("config: %+v", cf)
	}
	layers, _ := img.Layers()
	if len(layers) != 1 {
		t.Fatalf("%d layers, want 1", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var got []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(created) {
			t.Errorf("%s: uid %d gid %d time %s", h.Name, h.Uid, h.Gid, h.ModTime)
		}
		got = append(got, h.Name+" "+os.FileMode(h.Mode).String())
	}
	want := []string{"etc/ -rwxr-xr-x", "etc/tool/ -rwxr-xr-x", "etc/tool/config -rw-r--r--", "usr/ -rwxr-xr-x", "usr/local/ -rwxr-xr-x", "usr/local/bin/ -rwxr-xr-x", "usr/local/bin/tool -rwxr-xr-x"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("layer entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestBuildRefusesBadFiles(t *testing.T) {
	for name, files := range map[string][]File{
		"relative":            {{Path: "bin/x", Mode: 0o755}},
		"root":                {{Path: "/", Mode: 0o755}},
		"twice":               {{Path: "/x", Mode: 0o644}, {Path: "/x", Mode: 0o644}},
		"file then directory": {{Path: "/x", Mode: 0o644}, {Path: "/x/y", Mode: 0o644}},
	} {
		s := spec()
		s.Files = files
		if _, err := Build(s); err == nil {
			t.Errorf("%s: built", name)
		}
	}
	s := spec()
	s.Arch = ""
	if _, err := Build(s); err == nil {
		t.Error("no architecture: built")
	}
}

// The archive holds an OCI layout naming the image (what containerd reads)
// and Docker's manifest.json (what docker load before 25 reads), both for
// the same blobs.
func TestWriteArchive(t *testing.T) {
	img, err := Build(spec())
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "img.tar")
	const ref = "localhost/meshid/tool:dev"
	if err := WriteArchive(file, ref, img, created); err != nil {
		t.Fatal(err)
	}
	entries := map[string][]byte{}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		entries[h.Name] = data
	}
	var index struct {
		Manifests []struct {
			Digest      string            `json:"digest"`
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(entries["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	if len(index.Manifests) != 1 || index.Manifests[0].Digest != digest.String() ||
		index.Manifests[0].Annotations["io.containerd.image.name"] != ref || index.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "dev" {
		t.Fatalf("index.json: %s", entries["index.json"])
	}
	manifest, _ := img.RawManifest()
	if !bytes.Equal(entries["blobs/sha256/"+digest.Hex], manifest) {
		t.Fatal("the manifest blob is not the image's manifest")
	}
	if string(entries["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Fatalf("oci-layout: %s", entries["oci-layout"])
	}
	// go-containerregistry reads the Docker side back to the same layers.
	tag, err := nameTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	back, err := tarball.ImageFromPath(file, &tag)
	if err != nil {
		t.Fatal(err)
	}
	wantLayers, _ := img.Layers()
	gotLayers, _ := back.Layers()
	if len(gotLayers) != len(wantLayers) {
		t.Fatalf("%d layers read back, want %d", len(gotLayers), len(wantLayers))
	}
	for i := range wantLayers {
		w, _ := wantLayers[i].DiffID()
		g, _ := gotLayers[i].DiffID()
		if w != g {
			t.Fatalf("layer %d: %s read back, want %s", i, g, w)
		}
	}
	var cfgName v1.Hash
	if cfgName, err = back.ConfigName(); err != nil {
		t.Fatal(err)
	}
	if want, _ := img.ConfigName(); cfgName != want {
		t.Fatalf("config %s read back, want %s", cfgName, want)
	}

	// The same image written again is the same file.
	again := filepath.Join(t.TempDir(), "img.tar")
	if err := WriteArchive(again, ref, img, created); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(file)
	b, _ := os.ReadFile(again)
	if !bytes.Equal(a, b) {
		t.Fatal("the same image gave two different archives")
	}

	if err := WriteArchive(filepath.Join(t.TempDir(), "x.tar"), "localhost/meshid/tool", img, created); err == nil {
		t.Fatal("a reference without a tag was accepted")
	}
}

func nameTag(ref string) (name.Tag, error) { return name.NewTag(ref) }
