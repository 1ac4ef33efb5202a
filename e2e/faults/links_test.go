package faults

import (
	"context"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// toxi is the toxiproxy server whose proxies stand between meshid's
// components (used as a library: no toxiproxy process, no HTTP API).
var toxi = toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())

// link is a TCP connection between two components that a fault can cut.
type link struct {
	Addr  string // where the downstream component connects
	proxy *toxiproxy.Proxy
}

func newLink(t *testing.T, name, upstream string) *link {
	t.Helper()
	p := toxiproxy.NewProxy(toxi, name, "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		t.Fatalf("toxiproxy %s: %v", name, err)
	}
	t.Cleanup(p.Stop)
	return &link{Addr: p.Listen, proxy: p}
}

// Down closes the link's connections and refuses new ones, as a process
// that is gone or restarting.
func (l *link) Down() { l.proxy.Stop() }

// Up accepts connections again on the same address.
func (l *link) Up(t *testing.T) {
	t.Helper()
	var err error
	for range 50 {
		if err = l.proxy.Start(); err == nil || err == toxiproxy.ErrProxyAlreadyStarted {
			return
		}
		time.Sleep(100 * time.Millisecond) // the port is released
	}
	t.Fatalf("toxiproxy %s: starting again: %v", l.proxy.Name, err)
}

// Partition lets connections open but carries no byte either way, as a
// network that drops packets: callers hang until their own timeouts.
func (l *link) Partition(t *testing.T) {
	t.Helper()
	for _, stream := range []string{"upstream", "downstream"} {
		body := `{"name":"partition-` + stream + `","type":"timeout","stream":"` + stream + `","toxicity":1,"attributes":{"timeout":0}}`
		if _, err := l.proxy.Toxics.AddToxicJson(strings.NewReader(body)); err != nil {
			t.Fatalf("toxiproxy %s: %v", l.proxy.Name, err)
		}
	}
}

// Latency delays each direction by d.
func (l *link) Latency(t *testing.T, d time.Duration) {
	t.Helper()
	body := `{"name":"latency","type":"latency","stream":"downstream","toxicity":1,"attributes":{"latency":` + strconv.FormatInt(d.Milliseconds(), 10) + `}}`
	if _, err := l.proxy.Toxics.AddToxicJson(strings.NewReader(body)); err != nil {
		t.Fatalf("toxiproxy %s: %v", l.proxy.Name, err)
	}
}

// Heal removes every toxic. Connections a partition held stay as they are
// (their bytes were dropped): the components must notice and reconnect.
func (l *link) Heal() { l.proxy.Toxics.ResetToxics(context.Background()) }

// balancer spreads connections over meshid-ca's replicas as a Service does
// (kube-proxy): each new connection to the next replica that accepts it.
type balancer struct {
	Addr     string
	backends func() []string
	next     atomic.Uint64
	lis      net.Listener
	wg       sync.WaitGroup
}

func newBalancer(t *testing.T, backends func() []string) *balancer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &balancer{Addr: lis.Addr().String(), backends: backends, lis: lis}
	go b.serve()
	t.Cleanup(func() { lis.Close() })
	return b
}

func (b *balancer) serve() {
	for {
		c, err := b.lis.Accept()
		if err != nil {
			return
		}
		go b.forward(c)
	}
}

func (b *balancer) forward(c net.Conn) {
	defer c.Close()
	backends := b.backends()
	start := b.next.Add(1)
	var up net.Conn
	for i := range backends {
		addr := backends[(int(start)+i)%len(backends)]
		if addr == "" {
			continue
		}
		var err error
		if up, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
			break
		}
	}
	if up == nil {
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, c); done <- struct{}{} }()
	go func() { io.Copy(c, up); done <- struct{}{} }()
	<-done
}
