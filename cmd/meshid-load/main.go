// Command meshid-load drives CreateCertificate over real gRPC + TLS at a
// chosen concurrency and reports certificates per second and latency. In the
// same run it measures the in-process limit of signing (parse the CSR, check
// its signature, create and check the certificate, on all cores, no gRPC),
// before and after the load, so the end-to-end figure comes with a baseline
// taken on the same machine at the same time.
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshid/meshid/agent"
	"github.com/meshid/meshid/ca"
	"github.com/meshid/meshid/ca/csr"
	"github.com/meshid/meshid/ca/keys"
	"github.com/meshid/meshid/internal/satoken"
)

type config struct {
	addr          string
	rootFile      string
	serverName    string
	issuerKey     string
	issuerURL     string
	trustDomain   string
	audience      string
	concurrency   int
	conns         int
	identities    int
	duration      time.Duration
	warmup        time.Duration
	limitDuration time.Duration
	workloadKey   string
	caKeyType     string
	jsonOut       bool
	printJWKS     bool
	cpuProfile    string
	loadProcs     int
}

func main() {
	var c config
	flag.StringVar(&c.addr, "addr", "127.0.0.1:15012", "meshid-ca gRPC address")
	flag.StringVar(&c.rootFile, "root-file", "", "PEM root(s) to verify the CA's TLS certificate (required)")
	flag.StringVar(&c.serverName, "server-name", "istiod.istio-system.svc", "name the CA's TLS certificate must carry")
	flag.StringVar(&c.issuerKey, "token-issuer-key", "", "private key of the local token issuer whose JWKS meshid-ca trusts (required; created if missing)")
	flag.StringVar(&c.issuerURL, "token-issuer", "https://meshid-demo.local", "iss claim of minted tokens")
	flag.StringVar(&c.trustDomain, "trust-domain", "cluster.local", "trust domain of the CA")
	flag.StringVar(&c.audience, "audience", "istio-ca", "token audience")
	flag.IntVar(&c.concurrency, "concurrency", 64, "requests in flight")
	flag.IntVar(&c.conns, "conns", 2, "gRPC connections the requests are spread over")
	flag.IntVar(&c.identities, "identities", 64, "distinct service accounts (each with its own key, CSR and token)")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "measured load time")
	flag.DurationVar(&c.warmup, "warmup", 2*time.Second, "unmeasured load first (fills the token cache, warms connections)")
	flag.DurationVar(&c.limitDuration, "limit-duration", 5*time.Second, "time for each in-process limit measurement (before and after the load); 0 skips it")
	flag.StringVar(&c.workloadKey, "workload-key", "ecdsa-p256", "workload key type: ecdsa-p256 or rsa-2048")
	flag.StringVar(&c.caKeyType, "ca-key-type", string(keys.ECDSAP256), "CA key type of the in-process limit; match the server's")
	flag.BoolVar(&c.jsonOut, "json", false, "print the result as JSON")
	flag.BoolVar(&c.printJWKS, "print-jwks", false, "print the JWKS of --token-issuer-key (creating the key) for meshid-ca's --jwks-file, and exit")
	flag.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of the load phase (this process) to this file")
	flag.IntVar(&c.loadProcs, "load-procs", 0, "GOMAXPROCS of this process while it generates load (0: unchanged); the in-process limit always uses all cores")
	flag.Parse()
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "meshid-load:", err)
		os.Exit(1)
	}
}

type result struct {
	Cores           int     `json:"cores"`
	Concurrency     int     `json:"concurrency"`
	Connections     int     `json:"connections"`
	Identities      int     `json:"identities"`
	WorkloadKey     string  `json:"workload_key"`
	LimitBefore     float64 `json:"limit_before_certs_per_sec"`
	LimitAfter      float64 `json:"limit_after_certs_per_sec"`
	Throughput      float64 `json:"e2e_certs_per_sec"`
	Ratio           float64 `json:"ratio_to_limit"`
	P50Millis       float64 `json:"p50_ms"`
	P99Millis       float64 `json:"p99_ms"`
	MaxMillis       float64 `json:"max_ms"`
	Requests        int     `json:"requests"`
	Errors          int     `json:"errors"`
	FirstError      string  `json:"first_error,omitempty"`
	DurationSeconds float64 `json:"duration_s"`
}

type identity struct {
	id     spiffeid.ID
	csrPEM []byte
	csr    string
	ctx    context.Context // carries the token
}

func run(c config) error {
	if c.printJWKS {
		if c.issuerKey == "" {
			return errors.New("--print-jwks needs --token-issuer-key")
		}
		issuer, err := satoken.LoadOrCreate(c.issuerURL, c.issuerKey)
		if err != nil {
			return err
		}
		_, err = os.Stdout.Write(append(issuer.JWKS(), '\n'))
		return err
	}
	if c.rootFile == "" || c.issuerKey == "" {
		return errors.New("--root-file and --token-issuer-key are required")
	}
	if c.concurrency < 1 || c.conns < 1 || c.identities < 1 {
		return errors.New("--concurrency, --conns and --identities must be positive")
	}
	td, err := spiffeid.TrustDomainFromString(c.trustDomain)
	if err != nil {
		return err
	}
	rootPEM, err := os.ReadFile(c.rootFile)
	if err != nil {
		return err
	}
	roots, err := ca.ParseCertificatesPEM(rootPEM)
	if err != nil {
		return fmt.Errorf("--root-file: %w", err)
	}
	issuer, err := satoken.LoadOrCreate(c.issuerURL, c.issuerKey)
	if err != nil {
		return err
	}
	ids := make([]identity, c.identities)
	for i := range ids {
		ns, sa := "load", fmt.Sprintf("sa-%d", i)
		key, err := newKey(c.workloadKey)
		if err != nil {
			return err
		}
		ids[i].id = spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa)
		if ids[i].csrPEM, err = agent.NewCSR(key, ids[i].id); err != nil {
			return err
		}
		ids[i].csr = string(ids[i].csrPEM)
		token, err := issuer.Token(satoken.Claims{Namespace: ns, ServiceAccount: sa, Audiences: []string{c.audience}, TTL: 2 * time.Hour})
		if err != nil {
			return err
		}
		ids[i].ctx = metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token, "clusterid", "load")
	}

	res := result{Cores: runtime.GOMAXPROCS(0), Concurrency: c.concurrency, Connections: c.conns, Identities: c.identities, WorkloadKey: c.workloadKey}
	if c.limitDuration > 0 {
		if res.LimitBefore, err = inProcessLimit(c, ids[0]); err != nil {
			return err
		}
	}

	clients := make([]pb.IstioCertificateServiceClient, c.conns)
	for i := range clients {
		conn, err := agent.DialCA(c.addr, func() []*x509.Certificate { return roots }, c.serverName, grpc.WithSharedWriteBuffer(true))
		if err != nil {
			return err
		}
		defer conn.Close()
		clients[i] = pb.NewIstioCertificateServiceClient(conn)
	}
	if c.loadProcs > 0 {
		prev := runtime.GOMAXPROCS(c.loadProcs)
		defer runtime.GOMAXPROCS(prev)
	}
	if _, err := load(clients, ids, c.concurrency, c.warmup); err != nil {
		return err
	}
	if c.cpuProfile != "" {
		f, err := os.Create(c.cpuProfile)
		if err != nil {
			return err
		}
		pprof.StartCPUProfile(f)
	}
	l, err := load(clients, ids, c.concurrency, c.duration)
	if c.cpuProfile != "" {
		pprof.StopCPUProfile()
	}
	if err != nil {
		return err
	}
	res.Requests, res.Errors, res.FirstError = l.requests, l.errors, l.firstError
	res.DurationSeconds = l.elapsed.Seconds()
	res.Throughput = float64(l.requests-l.errors) / l.elapsed.Seconds()
	res.P50Millis, res.P99Millis, res.MaxMillis = l.quantile(0.50), l.quantile(0.99), l.quantile(1)

	if c.loadProcs > 0 {
		runtime.GOMAXPROCS(res.Cores)
	}
	if c.limitDuration > 0 {
		if res.LimitAfter, err = inProcessLimit(c, ids[0]); err != nil {
			return err
		}
		res.Ratio = res.Throughput / ((res.LimitBefore + res.LimitAfter) / 2)
	}
	if c.jsonOut {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Printf("cores %d, workload key %s, %d identities\n", res.Cores, res.WorkloadKey, res.Identities)
	if c.limitDuration > 0 {
		fmt.Printf("in-process limit (parse CSR + check signature + sign + check, all cores): %.0f certs/s before, %.0f after\n", res.LimitBefore, res.LimitAfter)
	}
	fmt.Printf("end-to-end (gRPC + TLS, concurrency %d over %d connections): %.0f certs/s, p50 %.2f ms, p99 %.2f ms, max %.2f ms, %d requests, %d errors\n",
		res.Concurrency, res.Connections, res.Throughput, res.P50Millis, res.P99Millis, res.MaxMillis, res.Requests, res.Errors)
	if res.FirstError != "" {
		fmt.Printf("first error: %s\n", res.FirstError)
	}
	if c.limitDuration > 0 {
		fmt.Printf("end-to-end / in-process limit: %.0f%%\n", 100*res.Ratio)
	}
	return nil
}

func newKey(kind string) (crypto.Signer, error) {
	switch kind {
	case "ecdsa-p256":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "rsa-2048":
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return nil, fmt.Errorf("--workload-key: unknown %q", kind)
}

type loadResult struct {
	requests, errors int
	firstError       string
	elapsed          time.Duration
	latencies        []time.Duration
}

func (l *loadResult) quantile(q float64) float64 {
	if len(l.latencies) == 0 {
		return 0
	}
	i := int(q * float64(len(l.latencies)-1))
	return float64(l.latencies[i]) / float64(time.Millisecond)
}

// load keeps concurrency requests in flight for d.
func load(clients []pb.IstioCertificateServiceClient, ids []identity, concurrency int, d time.Duration) (*loadResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var (
		mu       sync.Mutex
		all      = &loadResult{}
		errCount atomic.Int64
	)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := clients[w%len(clients)]
			lat := make([]time.Duration, 0, 4096)
			var errs int
			var first string
			for i := w; ctx.Err() == nil; i += concurrency {
				id := ids[i%len(ids)]
				t0 := time.Now()
				// The response is checked for shape only: parsing the
				// chain would make the load generator, which shares the
				// machine, compete with the CA for CPU.
				resp, err := client.CreateCertificate(id.ctx, &pb.IstioCertificateRequest{Csr: id.csr, ValidityDuration: 3600})
				if err == nil && len(resp.GetCertChain()) < 2 {
					err = errors.New("chain of fewer than 2 certificates")
				}
				if ctx.Err() != nil && err != nil {
					break
				}
				if err != nil {
					errs++
					if first == "" {
						first = status.Convert(err).String()
					}
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			all.latencies = append(all.latencies, lat...)
			all.requests += len(lat) + errs
			all.errors += errs
			if all.firstError == "" {
				all.firstError = first
			}
			mu.Unlock()
			errCount.Add(int64(errs))
		}()
	}
	wg.Wait()
	all.elapsed = time.Since(start)
	slices.Sort(all.latencies)
	return all, nil
}

// inProcessLimit measures what one machine can sign with no network: the
// same CSR path as the server (csr.Validate, then ca.Authority.Issue) on
// GOMAXPROCS goroutines.
func inProcessLimit(c config, id identity) (float64, error) {
	alg, err := keys.ParseAlgorithm(c.caKeyType)
	if err != nil {
		return 0, err
	}
	m, err := keys.Generate(keys.Options{TrustDomain: c.trustDomain, Algorithm: alg})
	if err != nil {
		return 0, err
	}
	var src keys.Source
	is, err := m.Issuer(time.Now())
	if err != nil {
		return 0, err
	}
	src.Set(is)
	authority, err := ca.New(ca.Config{Issuers: &src})
	if err != nil {
		return 0, err
	}
	var n atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(c.limitDuration)
	var wg sync.WaitGroup
	start := time.Now()
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				pub, err := csr.Validate(id.csrPEM, id.id)
				if err == nil {
					_, err = authority.Issue(ca.Request{ID: id.id, PublicKey: pub, TTL: time.Hour})
				}
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, err
	}
	return float64(n.Load()) / time.Since(start).Seconds(), nil
}
