package sds

import (
	"net"
	"strconv"
	"sync/atomic"
)

// peerListener names each accepted connection's remote address after the
// process at the other end (its PID, from the kernel), so the agent can
// share token reviews fairly between the processes on its socket: one
// process opening many connections is still one. A process the kernel
// cannot name to the agent (in a PID namespace the agent does not see, as
// a proxy in another pod is unless the agent shares the host's) is known
// by its connection instead.
type peerListener struct {
	net.Listener
	conns *atomic.Uint64
}

func newPeerListener(l net.Listener) peerListener {
	return peerListener{Listener: l, conns: new(atomic.Uint64)}
}

func (l peerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if pid, ok := peerPID(c); ok && pid > 0 {
		return peerConn{Conn: c, addr: processAddr(pid)}, nil
	}
	return peerConn{Conn: c, addr: connAddr(l.conns.Add(1))}, nil
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

// connAddr is a Unix socket peer known only by its connection.
type connAddr uint64

func (connAddr) Network() string  { return "unix" }
func (a connAddr) String() string { return "conn:" + strconv.FormatUint(uint64(a), 10) }

// processAddr is a Unix socket peer known by its process ID.
type processAddr int

func (processAddr) Network() string  { return "unix" }
func (a processAddr) String() string { return "pid:" + strconv.Itoa(int(a)) }
