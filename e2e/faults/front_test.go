package faults

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// apiFront stands between meshid and kube-apiserver: a TLS reverse proxy
// that forwards with the admin's credentials and, on demand, is down
// (every connection closed, none accepted), slow, or answers a share of
// requests with 429 or 5xx, as an API server in a brownout does.
type apiFront struct {
	Kubeconfig string // for meshid's components: the front, trusted by its own CA

	addr   string
	proxy  *httputil.ReverseProxy
	tlsCfg *tls.Config

	mu    sync.Mutex
	srv   *http.Server
	conns map[net.Conn]struct{}

	delay     atomic.Int64 // per request
	errStatus atomic.Int32 // answered instead of forwarding, to errShare of requests
	errShare  atomic.Uint32
	n         atomic.Uint64
	held      atomic.Pointer[heldWrites]
	// HeldWrites counts writes whose answers were held back.
	HeldWrites atomic.Uint64
	Forwarded  atomic.Uint64
	Failed     atomic.Uint64 // answered with errStatus
}

func newAPIFront(t *testing.T, upstream *rest.Config) *apiFront {
	t.Helper()
	target, err := url.Parse(upstream.Host)
	if err != nil {
		t.Fatal(err)
	}
	transport, err := rest.TransportFor(upstream)
	if err != nil {
		t.Fatal(err)
	}
	f := &apiFront{conns: map[net.Conn]struct{}{}}
	f.proxy = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Header.Del("Authorization") // the admin's transport authenticates
		},
		Transport:     transport,
		FlushInterval: -1, // watches stream
		ErrorLog:      nil,
	}
	certPEM, tlsCert := selfSigned(t)
	f.tlsCfg = &tls.Config{Certificates: []tls.Certificate{tlsCert}, NextProtos: []string{"http/1.1"}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = lis.Addr().String()
	f.serve(lis)
	t.Cleanup(f.close)

	kc := clientcmdapi.NewConfig()
	kc.Clusters["front"] = &clientcmdapi.Cluster{Server: "https://" + f.addr, CertificateAuthorityData: certPEM}
	kc.AuthInfos["front"] = &clientcmdapi.AuthInfo{Token: "front"}
	kc.Contexts["front"] = &clientcmdapi.Context{Cluster: "front", AuthInfo: "front"}
	kc.CurrentContext = "front"
	f.Kubeconfig = filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, f.Kubeconfig); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *apiFront) serve(lis net.Listener) {
	srv := &http.Server{
		Handler: http.HandlerFunc(f.handle),
		ConnState: func(c net.Conn, s http.ConnState) {
			f.mu.Lock()
			defer f.mu.Unlock()
			switch s {
			case http.StateNew:
				f.conns[c] = struct{}{}
			case http.StateClosed, http.StateHijacked:
				delete(f.conns, c)
			}
		},
		ErrorLog: nil,
	}
	srv.SetKeepAlivesEnabled(true)
	f.mu.Lock()
	f.srv = srv
	f.mu.Unlock()
	go srv.Serve(tls.NewListener(lis, f.tlsCfg))
}

func (f *apiFront) handle(w http.ResponseWriter, r *http.Request) {
	if d := time.Duration(f.delay.Load()); d > 0 {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
	}
	if code := int(f.errStatus.Load()); code != 0 {
		// Every errShare-th request, in bursts as the counter wraps.
		if share := f.errShare.Load(); share > 0 && f.n.Add(1)%uint64(share) != 0 {
			f.Failed.Add(1)
			if code == http.StatusTooManyRequests {
				w.Header().Set("Retry-After", "1")
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(code)
			w.Write([]byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","message":"injected by the fault suite","code":` + strconv.Itoa(code) + `}`))
			return
		}
	}
	f.Forwarded.Add(1)
	if h := f.held.Load(); h != nil && r.Method == http.MethodPut && strings.Contains(r.URL.Path, h.path) {
		// The write reaches the API server; its writer hears of it only
		// after h.delay (and not at all if it dies meanwhile).
		rec := httptest.NewRecorder()
		f.proxy.ServeHTTP(rec, r)
		f.HeldWrites.Add(1)
		select {
		case <-time.After(h.delay):
		case <-r.Context().Done():
			return
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
		return
	}
	f.proxy.ServeHTTP(w, r)
}

// heldWrites is HoldWrites's setting.
type heldWrites struct {
	path  string
	delay time.Duration
}

// HoldWrites forwards every PUT to a path containing path at once, but
// holds its answer back for delay (0: no more).
func (f *apiFront) HoldWrites(path string, delay time.Duration) {
	if delay <= 0 {
		f.held.Store(nil)
		return
	}
	f.held.Store(&heldWrites{path: path, delay: delay})
}

// Down closes every connection and stops accepting: clients see the API
// server gone.
func (f *apiFront) Down() {
	f.mu.Lock()
	srv := f.srv
	f.srv = nil
	f.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// Up listens again on the same address.
func (f *apiFront) Up(t *testing.T) {
	t.Helper()
	var lis net.Listener
	var err error
	for range 50 {
		if lis, err = net.Listen("tcp", f.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond) // the port is released
	}
	if err != nil {
		t.Fatalf("front: listening again on %s: %v", f.addr, err)
	}
	f.serve(lis)
}

// Slow delays every request by d (0: none).
func (f *apiFront) Slow(d time.Duration) { f.delay.Store(int64(d)) }

// Fail answers all but one request in every share with code (0: none).
func (f *apiFront) Fail(code int, share uint32) {
	f.errShare.Store(share)
	f.errStatus.Store(int32(code))
}

// Heal undoes Slow and Fail.
func (f *apiFront) Heal() {
	f.Slow(0)
	f.Fail(0, 0)
}

func (f *apiFront) close() { f.Down() }

func selfSigned(t *testing.T) ([]byte, tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "fault front"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
