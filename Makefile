# Shortcuts; the scripts in hack/ are what they run and need only Go and bash.
.PHONY: build demo test unit fuzz perf assets images cluster-up cluster-down cluster-test clean

build:
	go build -o bin/ ./cmd/...

demo:
	hack/demo.sh

test:
	hack/test.sh

# Unit tests only: no kube-apiserver, pilot-agent or step-ca (those tests skip).
unit:
	go test -race -short ./...

fuzz:
	hack/fuzz.sh

perf:
	hack/perf-ca.sh

# Container images as archives in dist/images (no Docker daemon needed).
images:
	hack/images.sh

# A real single-node cluster on this machine (root), and the test on it.
cluster-up:
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

cluster-test:
	hack/cluster-test.sh

assets:
	hack/kube-assets.sh
	hack/pilot-agent.sh
	hack/step-ca.sh
	hack/kube-node.sh

clean:
	rm -rf bin dist .meshid-demo
