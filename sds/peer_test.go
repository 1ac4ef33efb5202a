package sds

import (
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
)

// A connection on the agent's socket is known by the process at the other
// end, so review shares go per process however many connections it opens.
func TestListenNamesPeerProcess(t *testing.T) {
	l, err := Listen(filepath.Join(t.TempDir(), "s"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for range 2 {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		want := "pid:" + strconv.Itoa(os.Getpid())
		if runtime.GOOS != "linux" {
			want = s.RemoteAddr().String() // no peer credentials: a connection number
		}
		if got := s.RemoteAddr().String(); got != want {
			t.Errorf("remote address %q, want %q", got, want)
		}
	}
}
