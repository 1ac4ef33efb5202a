package ociimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// File is one entry of an image's filesystem. A Mode with fs.ModeDir makes
// it a directory (Data unused).
type File struct {
	Path string // absolute, such as /usr/local/bin/meshid-ca
	Mode fs.FileMode
	Data []byte
}

// Spec is everything an image is made of.
type Spec struct {
	Files      []File
	Entrypoint []string
	Cmd        []string
	Env        []string
	User       string // "65532:65532"; empty: root
	WorkingDir string
	Labels     map[string]string
	// Created is the image's creation time and every file's modification
	// time; the commit's time gives the same digest for the same commit.
	Created time.Time
	// Arch is the GOARCH the binaries were built for (amd64, arm64).
	Arch string
}

// Build makes the image Spec describes: one layer on an empty base, OCI
// media types.
func Build(spec Spec) (v1.Image, error) {
	if spec.Arch == "" {
		return nil, errors.New("ociimage: no architecture")
	}
	layerTar, err := layer(spec.Files, spec.Created)
	if err != nil {
		return nil, err
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("ociimage: layer: %w", err)
	}
	created := v1.Time{Time: spec.Created.UTC()}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     l,
		MediaType: types.OCILayer,
		History:   v1.History{Created: created, CreatedBy: "meshid internal/ociimage"},
	})
	if err != nil {
		return nil, fmt.Errorf("ociimage: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("ociimage: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = spec.Arch
	cf.Created = created
	cf.Config = v1.Config{
		Entrypoint: spec.Entrypoint,
		Cmd:        spec.Cmd,
		Env:        spec.Env,
		User:       spec.User,
		WorkingDir: spec.WorkingDir,
		Labels:     spec.Labels,
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("ociimage: %w", err)
	}
	return img, nil
}

// layer is the uncompressed tar of files, with their parent directories,
// sorted, owned by root, all dated t.
func layer(files []File, t time.Time) ([]byte, error) {
	entries := map[string]File{}
	for _, f := range files {
		p := path.Clean(f.Path)
		if !path.IsAbs(p) || p == "/" {
			return nil, fmt.Errorf("ociimage: file path %q is not an absolute file path", f.Path)
		}
		if _, dup := entries[p]; dup {
			return nil, fmt.Errorf("ociimage: %s given twice", p)
		}
		f.Path = p
		entries[p] = f
		for dir := path.Dir(p); dir != "/"; dir = path.Dir(dir) {
			if e, ok := entries[dir]; ok {
				if !e.Mode.IsDir() {
					return nil, fmt.Errorf("ociimage: %s is a file and a directory", dir)
				}
				continue
			}
			entries[dir] = File{Path: dir, Mode: fs.ModeDir | 0o755}
		}
	}
	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range names {
		f := entries[p]
		hdr := &tar.Header{
			Name:    strings.TrimPrefix(p, "/"),
			Mode:    tarMode(f.Mode),
			ModTime: t.UTC(),
			Format:  tar.FormatPAX,
		}
		if f.Mode.IsDir() {
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
		} else {
			hdr.Typeflag = tar.TypeReg
			hdr.Size = int64(len(f.Data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("ociimage: %s: %w", p, err)
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, fmt.Errorf("ociimage: %s: %w", p, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("ociimage: %w", err)
	}
	return buf.Bytes(), nil
}

// tarMode is m's permission bits with setuid, setgid and sticky in tar's
// (and chmod's) positions.
func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}

// WriteArchive writes img to file as an image archive naming it ref (such
// as localhost/meshid/meshid-ca:dev), through a temporary file renamed into
// place. Its entries are dated created.
func WriteArchive(file, ref string, img v1.Image, created time.Time) error {
	tag, err := refTag(ref)
	if err != nil {
		return err
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	configName, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}

	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     types.OCIImageIndex,
		"manifests": []map[string]any{{
			"mediaType": mediaType,
			"digest":    digest.String(),
			"size":      len(manifest),
			"annotations": map[string]string{
				// containerd (ctr, kind) and Docker 25+ name the image
				// from this one...
				"io.containerd.image.name": ref,
				// ...the OCI layout's own annotation holds the tag.
				"org.opencontainers.image.ref.name": tag,
			},
		}},
	})
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}

	dir := filepath.Dir(file)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(file)+".tmp.*")
	if err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	defer os.Remove(tmp.Name())
	tw := tar.NewWriter(tmp)
	add := func(name string, data []byte) error {
		hdr := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: created.UTC(), Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if strings.HasSuffix(name, "/") {
			hdr = &tar.Header{Name: name, Mode: 0o755, ModTime: created.UTC(), Typeflag: tar.TypeDir, Format: tar.FormatPAX}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	blob := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

	var dockerLayers []string
	write := func() error {
		if err := add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
			return err
		}
		if err := add("blobs/", nil); err != nil {
			return err
		}
		if err := add("blobs/sha256/", nil); err != nil {
			return err
		}
		if err := add(blob(digest), manifest); err != nil {
			return err
		}
		if err := add(blob(configName), config); err != nil {
			return err
		}
		for _, l := range layers {
			h, err := l.Digest()
			if err != nil {
				return err
			}
			rc, err := l.Compressed()
			if err != nil {
				return err
			}
			data, err := io.ReadAll(rc)
			rc.Close()
			if err != nil {
				return err
			}
			if err := add(blob(h), data); err != nil {
				return err
			}
			dockerLayers = append(dockerLayers, blob(h))
		}
		if err := add("index.json", index); err != nil {
			return err
		}
		// Docker engines before 25 read only this.
		dockerManifest, err := json.Marshal([]map[string]any{{
			"Config":   blob(configName),
			"RepoTags": []string{ref},
			"Layers":   dockerLayers,
		}})
		if err != nil {
			return err
		}
		if err := add("manifest.json", dockerManifest); err != nil {
			return err
		}
		return tw.Close()
	}
	if err := write(); err != nil {
		tmp.Close()
		return fmt.Errorf("ociimage: writing %s: %w", file, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("ociimage: writing %s: %w", file, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	if err := os.Rename(tmp.Name(), file); err != nil {
		return fmt.Errorf("ociimage: %w", err)
	}
	return nil
}

// refTag is the tag of ref, which must name one (repository:tag).
func refTag(ref string) (string, error) {
	slash := strings.LastIndex(ref, "/")
	colon := strings.LastIndex(ref, ":")
	if colon <= slash || colon == len(ref)-1 || strings.Contains(ref, "@") {
		return "", fmt.Errorf("ociimage: image reference %q has no tag (want repository:tag)", ref)
	}
	return ref[colon+1:], nil
}
