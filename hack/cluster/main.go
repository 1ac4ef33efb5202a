// Command cluster runs the single-node Kubernetes cluster of
// internal/cluster; hack/cluster.sh builds what it needs and calls it:
//
//	go run ./hack/cluster up [flags]   start it; returns once the node is Ready
//	go run ./hack/cluster down         remove it, and everything it left
//	go run ./hack/cluster status       what runs
//	go run ./hack/cluster env          KUBECONFIG and MESHID_CLUSTER_DIR, for eval
//	go run ./hack/cluster load FILE…   import image archives into its containerd
//	go run ./hack/cluster dsn          the ledger database's URL
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshid/meshid/internal/cluster"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		var usage usageError
		if errors.As(err, &usage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

type usageError struct{ error }

func run(args []string) error {
	if len(args) == 0 {
		return usageError{errors.New("usage: cluster up|down|status|env|load|dsn [flags]")}
	}
	verb, args := args[0], args[1:]
	fs := flag.NewFlagSet("cluster "+verb, flag.ContinueOnError)
	dir := fs.String("dir", envOr("MESHID_CLUSTER_DIR", "/var/lib/meshid-cluster"), "state directory ($MESHID_CLUSTER_DIR)")
	binPath := fs.String("bin-path", "", "directories holding the Kubernetes binaries and coredns, colon-separated")
	pause := fs.String("pause-archive", filepath.Join("dist", "images", "pause.tar"), "the sandbox image's archive (go run ./hack/images pause)")
	gates := fs.String("feature-gates", os.Getenv("MESHID_CLUSTER_FEATURE_GATES"), "feature gates of every component ($MESHID_CLUSTER_FEATURE_GATES)")
	runtimeConfig := fs.String("runtime-config", os.Getenv("MESHID_CLUSTER_RUNTIME_CONFIG"), "the API server's --runtime-config ($MESHID_CLUSTER_RUNTIME_CONFIG)")
	noPostgres := fs.Bool("no-postgres", false, "no PostgreSQL server for the ledger")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	switch verb {
	case "up":
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		begin := time.Now()
		c, err := cluster.Up(ctx, cluster.Config{
			Dir:           *dir,
			BinPath:       filepath.SplitList(*binPath),
			PauseArchive:  *pause,
			FeatureGates:  *gates,
			RuntimeConfig: *runtimeConfig,
			Postgres:      !*noPostgres,
			Progress:      os.Stderr,
		})
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "cluster: up in %.1fs; node %s at %s\n", time.Since(begin).Seconds(), c.NodeName, c.NodeIP)
		fmt.Fprintf(os.Stderr, "cluster: export KUBECONFIG=%s (or eval \"$(hack/cluster.sh env)\")\n", c.Kubeconfig())
		return nil
	case "down":
		return cluster.Down(*dir, os.Stderr)
	case "env":
		c, err := cluster.Open(*dir)
		if err != nil {
			return err
		}
		fmt.Printf("export KUBECONFIG=%s\nexport MESHID_CLUSTER_DIR=%s\n", c.Kubeconfig(), c.Dir)
		return nil
	case "dsn":
		c, err := cluster.Open(*dir)
		if err != nil {
			return err
		}
		if c.PostgresDSN() == "" {
			return errors.New("cluster: started with --no-postgres")
		}
		fmt.Println(c.PostgresDSN())
		return nil
	case "load":
		c, err := cluster.Open(*dir)
		if err != nil {
			return err
		}
		if fs.NArg() == 0 {
			return usageError{errors.New("usage: cluster load ARCHIVE...")}
		}
		return c.Import(context.Background(), fs.Args()...)
	case "status":
		c, err := cluster.Open(*dir)
		if err != nil {
			return err
		}
		kube, err := c.Client()
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return fmt.Errorf("cluster: API server: %w", err)
		}
		for _, n := range nodes.Items {
			ready := "NotReady"
			for _, cond := range n.Status.Conditions {
				if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
					ready = "Ready"
				}
			}
			fmt.Printf("node %s %s %s\n", n.Name, ready, n.Status.NodeInfo.KubeletVersion)
		}
		pods, err := kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		for _, p := range pods.Items {
			fmt.Printf("pod %s/%s %s\n", p.Namespace, p.Name, p.Status.Phase)
		}
		return nil
	default:
		return usageError{fmt.Errorf("cluster: unknown command %q (want %s)", verb, strings.Join([]string{"up", "down", "status", "env", "load", "dsn"}, ", "))}
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
