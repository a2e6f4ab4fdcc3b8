# The commands the README and CI use. `make help` lists them.
CARGO ?= cargo
DEMO_DIR ?= $(CURDIR)/.dev/demo

.PHONY: help deps build release demo demo-down test test-unit lint fmt ci

help:
	@echo "make deps       install the system packages the demo and tests need (apt-get, as root)"
	@echo "make demo       build release binaries and run a local cluster on loopback ($(DEMO_DIR))"
	@echo "make demo-down  stop the local cluster"
	@echo "make test       run every test (unit, cluster, end to end, Kubernetes manifests); nothing is skipped"
	@echo "make test-unit  a partial run without root or system tools: such tests are skipped and counted"
	@echo "make lint       rustfmt check and clippy with warnings as errors"
	@echo "make ci         lint + test, as CI runs them"
	@echo "make csi-sanity the CSI conformance suite against a local cluster, all and split mode (root)"
	@echo "make chaos      5 minutes of fio verify through kills, freezes and partitions (root; CHAOS_SECONDS=...)"
	@echo "make k8s-up     build and start a 3-node Kubernetes cluster on this machine (root); k8s-down stops it"
	@echo "make k8s-test   install Ballast on it with kubectl and run the Kubernetes suite (K8S_KEEP=1 keeps the cluster)"

deps:
	./scripts/deps.sh

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

demo: deps release
	DEMO_DIR=$(DEMO_DIR) ./deploy/demo.sh up

demo-down:
	DEMO_DIR=$(DEMO_DIR) ./deploy/demo.sh down

# SKIP_SYSTEM_TESTS=1 make test is test-unit: no package install either.
test: $(if $(filter 1,$(SKIP_SYSTEM_TESTS)),,deps)
	CARGO=$(CARGO) ./scripts/test.sh

test-unit:
	CARGO=$(CARGO) SKIP_SYSTEM_TESTS=1 ./scripts/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

ci: lint test

# csi-sanity built from github.com/kubernetes-csi/csi-test at the version the
# script pins, run against `ballast dev up` in all and split mode; at least
# 95 specs must pass in each, none may fail.
.PHONY: csi-sanity
csi-sanity: deps
	./tests/csi-sanity/run.sh

# fio verify while chunk servers and the metadata leader are killed, metadata
# is frozen and a chunk server is cut off; prints a table of what happened.
CHAOS_SECONDS ?= 300
.PHONY: chaos
chaos: deps
	$(CARGO) build --workspace
	BALLAST_SYSTEM_TESTS=required BALLAST_CHAOS_SECONDS=$(CHAOS_SECONDS) \
		$(CARGO) test -p nbd-client --test chaos -- --ignored --nocapture

.PHONY: bench-meta
bench-meta:
	$(CARGO) build --release -p meta-raft --bins --examples
	./target/release/examples/create_volumes 2000

# PEERS=ceph adds a single-host Ceph cluster beside the baselines (bench/ceph.py).
.PHONY: bench
bench: release
	python3 bench/run.py

# Bytes a chunk server copies to catch up after a short absence under writes.
.PHONY: bench-resync
bench-resync: release
	python3 bench/resync.py

# Kernel NBD tests in a VM (Debian kernel under QEMU TCG; needs root, fetches
# the kernel and QEMU .debs into .cache/vm/). See tests/vm/run.sh for knobs.
.PHONY: vm-test
vm-test:
	./tests/vm/run.sh

# A real Kubernetes cluster on this machine (root): Kubernetes, CoreDNS and
# the CSI sidecars built from the Go module proxy, containerd and etcd from
# Debian, three nodes in network namespaces (tests/k8s/). k8s-test installs
# Ballast with `kubectl apply -k deploy/kubernetes` and runs the suite; the
# cluster it started is removed afterwards (K8S_KEEP=1 keeps it).
.PHONY: k8s-build k8s-up k8s-down k8s-test
k8s-build: deps
	./tests/k8s/build.sh

k8s-up: k8s-build
	./tests/k8s/cluster.sh up

k8s-down:
	./tests/k8s/cluster.sh down

k8s-test: k8s-up
	./tests/k8s/suite.sh; status=$$?; [ "$(K8S_KEEP)" = 1 ] || ./tests/k8s/cluster.sh down; exit $$status
