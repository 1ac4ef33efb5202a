package cluster

import (
	"net"
	"slices"
	"testing"
)

func TestSplitRule(t *testing.T) {
	for _, tc := range []struct {
		line string
		want []string
	}{
		{`-A POSTROUTING -j KUBE-POSTROUTING`, []string{"-A", "POSTROUTING", "-j", "KUBE-POSTROUTING"}},
		{
			// What CNI's bridge plugin leaves in nat POSTROUTING, as iptables -S prints it.
			`-A POSTROUTING -s 10.222.0.43/32 -m comment --comment "name: \"meshid-cluster\" id: \"d98b\"" -j CNI-0d0332dc`,
			[]string{"-A", "POSTROUTING", "-s", "10.222.0.43/32", "-m", "comment", "--comment", `name: "meshid-cluster" id: "d98b"`, "-j", "CNI-0d0332dc"},
		},
		{`-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule" -j KUBE-NODEPORTS`,
			[]string{"-A", "KUBE-SERVICES", "-m", "comment", "--comment", "kubernetes service nodeports; NOTE: this must be the last rule", "-j", "KUBE-NODEPORTS"}},
		{`  -N   KUBE-X  `, []string{"-N", "KUBE-X"}},
		{`--comment ""`, []string{"--comment", ""}},
	} {
		if got := splitRule(tc.line); !slices.Equal(got, tc.want) {
			t.Errorf("splitRule(%q)\n got %q\nwant %q", tc.line, got, tc.want)
		}
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/var/lib/meshid-cluster/run`:           `/var/lib/meshid-cluster/run`,
		`/var/lib/a\040b/shm`:                   `/var/lib/a b/shm`,
		`/x\134y`:                               `/x\y`,
		`/trailing\04`:                          `/trailing\04`, // not a whole escape: kept
		`/tab\011and\040space\040twice\040\040`: "/tab\tand space twice  ",
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFeatureGatesYAML(t *testing.T) {
	if got := featureGatesYAML(""); got != "" {
		t.Errorf("no gates: %q, want empty", got)
	}
	want := "featureGates:\n  PodCertificateRequest: true\n  Foo: false\n"
	if got := featureGatesYAML("PodCertificateRequest=true, Foo=false"); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestJumpsTo(t *testing.T) {
	ours := func(c string) bool { return c == "KUBE-X" }
	if !jumpsTo(splitRule(`-A INPUT -m conntrack --ctstate NEW -j KUBE-X`), ours) {
		t.Error("a jump to KUBE-X not seen")
	}
	if jumpsTo(splitRule(`-A INPUT -m comment --comment "-j KUBE-X" -j ACCEPT`), ours) {
		t.Error("a comment naming KUBE-X taken for a jump")
	}
}

func TestBusy(t *testing.T) {
	lo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lo.Close()
	if port := lo.Addr().(*net.TCPAddr).Port; busy(port) {
		t.Errorf("a listener on 127.0.0.1:%d taken for one on every address", port)
	}
	any, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer any.Close()
	if port := any.Addr().(*net.TCPAddr).Port; !busy(port) {
		t.Errorf("a listener on 0.0.0.0:%d not seen", port)
	}
}
