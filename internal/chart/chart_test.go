package chart

import "testing"

func TestSplitImage(t *testing.T) {
	for _, tc := range []struct{ image, name, tag string }{
		{"registry.example.com/meshid/meshid-ca:dev", "registry.example.com/meshid/meshid-ca", "dev"},
		{"registry.example.org:5000/mesh/agent:1.2", "registry.example.org:5000/mesh/agent", "1.2"},
		{"registry.example.org:5000/mesh/agent", "registry.example.org:5000/mesh/agent", "latest"},
		{"meshid-ca", "meshid-ca", "latest"},
	} {
		if name, tag := splitImage(tc.image); name != tc.name || tag != tc.tag {
			t.Errorf("splitImage(%q) = %q, %q; want %q, %q", tc.image, name, tag, tc.name, tc.tag)
		}
	}
}
