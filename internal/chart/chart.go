package chart

import (
	"bytes"
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// ReleaseName is the release name Render uses; the chart's objects do not
// depend on it.
const ReleaseName = "meshid"

// Render renders the chart in dir with values over its defaults, as
// `helm template` does: values are checked against values.schema.json, and
// a template's fail stops the render. It returns each template's output by
// its name in the chart (templates/ca.yaml), without NOTES.txt and empty
// outputs. Templates referring to a value that does not exist are errors.
func Render(dir string, values map[string]any) (map[string]string, error) {
	out, err := render(dir, values)
	if err != nil {
		return nil, err
	}
	manifests := map[string]string{}
	for name, text := range out {
		if path.Base(name) == "NOTES.txt" || strings.TrimSpace(text) == "" {
			continue
		}
		manifests[name] = text
	}
	return manifests, nil
}

// Notes renders the chart's NOTES.txt, what helm install prints.
func Notes(dir string, values map[string]any) (string, error) {
	out, err := render(dir, values)
	if err != nil {
		return "", err
	}
	return out["templates/NOTES.txt"], nil
}

func render(dir string, values map[string]any) (map[string]string, error) {
	chrt, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("chart: loading %s: %w", dir, err)
	}
	if values == nil {
		values = map[string]any{}
	}
	top, err := chartutil.ToRenderValues(chrt, values, chartutil.ReleaseOptions{Name: ReleaseName, Namespace: "default", IsInstall: true, Revision: 1}, nil)
	if err != nil {
		return nil, fmt.Errorf("chart: %w", err)
	}
	out, err := engine.Engine{Strict: true}.Render(chrt, top)
	if err != nil {
		return nil, fmt.Errorf("chart: %w", err)
	}
	// Keys are <chart name>/templates/...; the chart's name is not the
	// caller's business.
	byName := map[string]string{}
	prefix := chrt.Name() + "/"
	for name, text := range out {
		byName[strings.TrimPrefix(name, prefix)] = text
	}
	return byName, nil
}

// Objects parses rendered manifests into objects, in the order helm
// install creates them (namespaces first, workloads last).
func Objects(manifests map[string]string) ([]*unstructured.Unstructured, error) {
	_, sorted, err := releaseutil.SortManifests(manifests, nil, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("chart: %w", err)
	}
	var objs []*unstructured.Unstructured
	for _, m := range sorted {
		var obj map[string]any
		if err := yaml.Unmarshal([]byte(m.Content), &obj); err != nil {
			return nil, fmt.Errorf("chart: %s: %w", m.Name, err)
		}
		if obj == nil {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: obj})
	}
	return objs, nil
}

// baseOrder is the order of deploy/base's files in its kustomization.
var baseOrder = []string{"namespace.yaml", "ca-rbac.yaml", "ca.yaml", "agent-rbac.yaml", "agent.yaml"}

// Base returns the files of the kustomize base generated from the chart's
// default render, by file name: one file per template, as rendered
// (comments included), and kustomization.yaml listing them, whose images
// block names the chart's default images. The generator
// (hack/gen-deploy-base) writes them into deploy/base.
func Base(dir string) (map[string][]byte, error) {
	manifests, err := Render(dir, nil)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{}
	var resources []string
	for name := range manifests {
		if !strings.HasPrefix(name, "templates/") || strings.Contains(strings.TrimPrefix(name, "templates/"), "/") {
			return nil, fmt.Errorf("chart: template %s is not directly under templates/", name)
		}
	}
	names := make([]string, 0, len(manifests))
	for name := range manifests {
		names = append(names, path.Base(name))
	}
	sort.Slice(names, func(i, j int) bool {
		return orderOf(names[i]) < orderOf(names[j]) || orderOf(names[i]) == orderOf(names[j]) && names[i] < names[j]
	})
	var images []string
	for _, name := range names {
		objs, err := Objects(map[string]string{name: manifests["templates/"+name]})
		if err != nil {
			return nil, err
		}
		images = appendImages(images, objs)
		var b bytes.Buffer
		b.WriteString(generatedHeader)
		b.WriteString(strings.TrimSpace(manifests["templates/"+name]))
		b.WriteString("\n")
		files[name] = b.Bytes()
		resources = append(resources, name)
	}
	var k bytes.Buffer
	k.WriteString(generatedHeader)
	k.WriteString(kustomizationText)
	for _, r := range resources {
		fmt.Fprintf(&k, "  - %s\n", r)
	}
	k.WriteString("images:\n  # The images hack/images.sh builds (loaded into a node, or pushed to a\n  # registry of yours: deploy/README.md). Point these at yours in an\n  # overlay of your own (an images entry with the same name), not here.\n")
	for _, img := range images {
		name, tag := splitImage(img)
		fmt.Fprintf(&k, "  - name: %s\n    newName: %s\n    newTag: %s\n", name, name, tag)
	}
	files["kustomization.yaml"] = k.Bytes()
	return files, nil
}

const generatedHeader = "# Generated from deploy/charts/meshid with its default values by\n# go run ./hack/gen-deploy-base: edit the chart, not this file.\n"

const kustomizationText = `# meshid: meshid-ca in meshid-system (2 replicas, PostgreSQL ledger, CA in a
# Secret) and meshid-agent on every node in meshid-node (node mode). Each
# object names its namespace: the agent's needs a Pod Security level the
# CA's must not have. See deploy/README.md.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
`

func orderOf(name string) int {
	for i, n := range baseOrder {
		if n == name {
			return i
		}
	}
	return len(baseOrder)
}

// appendImages appends the images of the workloads' containers in objs
// that images does not hold yet.
func appendImages(images []string, objs []*unstructured.Unstructured) []string {
	for _, o := range objs {
		containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		for _, c := range containers {
			m, _ := c.(map[string]any)
			img, _ := m["image"].(string)
			if img != "" && !slices.Contains(images, img) {
				images = append(images, img)
			}
		}
	}
	return images
}

// splitImage splits repository:tag (the port of a registry is not a tag).
func splitImage(image string) (name, tag string) {
	i := strings.LastIndex(image, ":")
	if i < 0 || strings.Contains(image[i:], "/") {
		return image, "latest"
	}
	return image[:i], image[i+1:]
}
