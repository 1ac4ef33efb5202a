# Shortcuts; the scripts in hack/ are what they run and need only Go and bash.
.PHONY: build demo test unit fuzz perf assets clean

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

assets:
	hack/kube-assets.sh
	hack/pilot-agent.sh
	hack/step-ca.sh

clean:
	rm -rf bin .meshid-demo
