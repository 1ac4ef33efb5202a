package sds

import (
	"net"
	"strconv"
)

// peerListener names each accepted connection's remote address after the
// process at the other end (its PID, from the kernel), so the agent can
// share token reviews fairly between the processes on its socket: one
// process opening many connections is still one.
type peerListener struct{ net.Listener }

func (l peerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if pid, ok := peerPID(c); ok {
		return peerConn{Conn: c, addr: processAddr(pid)}, nil
	}
	return c, nil
}

// SetUnlinkOnClose is the Unix listener's (see net.UnixListener).
func (l peerListener) SetUnlinkOnClose(unlink bool) {
	if ul, ok := l.Listener.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(unlink)
	}
}

type peerConn struct {
	net.Conn
	addr net.Addr
}

func (c peerConn) RemoteAddr() net.Addr { return c.addr }

// processAddr is a Unix socket peer known by its process ID.
type processAddr int

func (processAddr) Network() string  { return "unix" }
func (a processAddr) String() string { return "pid:" + strconv.Itoa(int(a)) }
