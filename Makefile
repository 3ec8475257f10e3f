# xlb — the two commands of the quick start are `make demo` and `make test`.
# Both install the Debian packages they need first, so a fresh Debian 12 machine with a stable
# Rust toolchain needs nothing else.

SHELL := /bin/bash
CARGO ?= cargo
# clang/llvm: the XDP filter; libelf, zlib, libpcap, pkg-config, m4: libxdp and libbpf, which
# xsk-rs builds from source; iproute2, ethtool, python3: the netns demo and its test peers;
# python3-venv: the manifest validator's environment; nginx-light, dnsmasq-base, socat, curl,
# dnsutils: the real servers and clients of the acceptance suite (deploy/acceptance); nftables:
# what `xlb run` with a `node:` section marks Service traffic with (control/src/node_link.rs);
# tcpdump: the gateway suite's captures of IP-in-IP frames (deploy/acceptance/gateways.py).
APT_PACKAGES := clang llvm libelf-dev zlib1g-dev libpcap-dev pkg-config m4 iproute2 ethtool python3 python3-venv \
	nginx-light dnsmasq-base socat curl dnsutils nftables tcpdump
# What `make image` adds: a container tool (podman, with runc), mmdebstrap for a base made
# locally (no registry is reachable), PyYAML to read the ConfigMap.
IMAGE_PACKAGES := podman runc mmdebstrap python3-yaml
# What the end-to-end benchmark adds: kube-proxy's kernel dataplanes and conntrack's tool.
BENCH_PACKAGES := iptables nftables conntrack
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
XLB := target/release/xlb
FRAMES := deploy/examples/frames

.PHONY: all deps toolchain build demo test lint loom manifests dashboard image fuzz bench bench-e2e bench-budget bench-flood bench-node

all: build

# Installs only what is missing; `apt-get update` runs only when something is.
deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

toolchain:
	@command -v $(CARGO) >/dev/null || { echo "make: cargo not found; install a stable Rust toolchain (rustup)" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 && $(CARGO) clippy --version >/dev/null 2>&1 || \
	  { echo "make: rustfmt and clippy are needed: rustup component add rustfmt clippy" >&2; exit 1; }

# The xlb binary is built on its own: in one build with pktgen or the benchmarks, cargo would
# unify features and ship the dataplane's test-util and control's fake-api in it.
BUILD_XLB := $(CARGO) build --release -p xlb-control --bin xlb
build: deps toolchain
	$(BUILD_XLB)

# xlb balancing real TCP and UDP traffic between network namespaces it creates and removes:
# a client, the node running `xlb run`, three backends (see deploy/demo/netns-demo.sh); then
# two nodes each running xlb as its kube-proxy (deploy/demo/two-nodes.py). Then
# `xlb explain` says, without a kernel, which backend a flow gets and why.
demo: build
	@echo "== xlb demo: real traffic through xlb in network namespaces (needs root)"
	$(SUDO) bash deploy/demo/netns-demo.sh $(XLB)
	@echo
	@echo "== two nodes, xlb in place of kube-proxy on each, Services from a Kubernetes API server"
	$(CARGO) build --release -p xlb-control --features fake-api --bin xlb-fake-api
	$(SUDO) python3 deploy/demo/two-nodes.py $(XLB) target/release/xlb-fake-api
	@echo
	@echo "== xlb explain: which backend a flow gets, computed by the workers' own code"
	$(XLB) explain --config deploy/examples/xlb.yaml tcp 198.18.0.1:40000 198.18.64.1:80

lint: deps toolchain
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Loom models of the flow table: a separate build with --cfg loom, so its own target dir.
# Two preemptions per execution bound the search (each model covers a two-thread race).
loom: deps toolchain
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 \
	  $(CARGO) test --release -p xlb-dataplane --test flow_loom

# The deployment manifests against the Kubernetes API schemas, offline: kubernetes-validate
# (from PyPI, installed once into target/manifest-venv) ships the schemas it checks with.
KUBE_VALIDATE := target/manifest-venv/bin/kubernetes-validate
manifests: deps
	@[ -x $(KUBE_VALIDATE) ] || { python3 -m venv target/manifest-venv && \
	  target/manifest-venv/bin/pip install -q --disable-pip-version-check kubernetes-validate==1.37.0; }
	$(KUBE_VALIDATE) --strict --quiet deploy/kubernetes/xlb.yaml
	@echo "deploy/kubernetes/xlb.yaml: valid against the Kubernetes 1.37 schemas"

# xlb's container image, built with podman from a Debian base made locally, then run on the
# DaemonSet's ConfigMap configuration (deploy/kubernetes/build-image.sh); says SKIPPED, with
# the reason, where no container tool can be installed or run.
image: deps toolchain
	$(BUILD_XLB)
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(IMAGE_PACKAGES)" || \
	  echo "image: could not install $(IMAGE_PACKAGES)"
	$(SUDO) bash deploy/kubernetes/build-image.sh $(XLB)

# The Grafana dashboard's shape, offline (the netns demo checks its metrics against a running
# xlb's /metrics).
dashboard: deps
	python3 deploy/grafana/check.py --self-test deploy/grafana/xlb.json

# The packet layer's fuzz target for FUZZ_SECONDS, seeded with every fixture frame. cargo-fuzz
# (installed once from crates.io) needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable
# compiler take them. A crash fails the run and leaves its input in dataplane/fuzz/artifacts.
FUZZ_SECONDS ?= 60
fuzz: deps toolchain
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz@0.13.2
	mkdir -p dataplane/fuzz/corpus/parse_rewrite
	XLB_FIXTURE_CORPUS_DIR="$(CURDIR)/dataplane/fuzz/corpus/parse_rewrite" \
	  $(CARGO) test -q -p xlb-dataplane --test packet_fixtures
	cd dataplane && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run parse_rewrite -- \
	  -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

# Everything: formatting, lints, the dataplane alone without test utilities, every test, the
# loom models, the manifests, the Grafana dashboard, the container image and a short fuzz run.
# Kernel tests (root, BPF, network namespaces) are #[ignore]d, so that a run without root
# reports them as ignored rather than passed; as root, make test runs them too.
KERNEL_TESTS := $(shell [ "$$(id -u)" = 0 ] && echo "-- --include-ignored")

test: lint
	$(CARGO) check -p xlb-dataplane
	$(CARGO) test --workspace $(KERNEL_TESTS)
	$(MAKE) --no-print-directory loom
	$(MAKE) --no-print-directory manifests
	$(MAKE) --no-print-directory dashboard
	$(MAKE) --no-print-directory image
	$(MAKE) --no-print-directory fuzz

# Criterion stages, then their medians per packet; bench/callgrind.sh gives instruction counts
# that do not depend on how busy the machine is.
# kube-sync: the Kubernetes source end to end at 10 000 and 100 000 Services.
bench: deps toolchain
	$(CARGO) bench -p xlb-bench
	$(CARGO) run -q --release -p xlb-bench --bin bench-summary
	$(MAKE) --no-print-directory bench-budget
	$(CARGO) run -q --release -p xlb-bench --bin kube-sync -- --services 10000
	$(CARGO) run -q --release -p xlb-bench --bin kube-sync -- --services 100000

# xlb against kube-proxy-shaped iptables and nftables rules and a bare AF_XDP forwarder, in one
# run, in namespaces (needs root), every figure REPS times with the contenders interleaved,
# medians, spreads and ratios with their significance, and a noise probe; writes
# bench/results/e2e.{md,svg,json}. SERVICES, SECONDS, REPS, CONTENDERS, MODES and E2E_OUT narrow
# or redirect it, e.g. `make bench-e2e SERVICES=1,10000 SECONDS=2 CONTENDERS=nftables,bare,xlb`
# (the run in bench/results) and `make bench-e2e SERVICES=1,100000 SECONDS=2
# CONTENDERS=bare,xlb MODES=dnat,snat E2E_OUT=bench/results/scale`.
SERVICES ?= 1,1000,10000,100000
SECONDS ?= 4
REPS ?= 5
CONTENDERS ?= iptables,nftables,bare,xlb
MODES ?= dnat,snat,dsr
E2E_OUT ?= bench/results
INSTALL_TIMEOUT ?= 900
bench-e2e: deps toolchain
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(BENCH_PACKAGES)"
	$(CARGO) build --release -p xlb-pktgen -p xlb-bench --bins
	$(BUILD_XLB)
	$(SUDO) python3 bench/e2e.py --services $(SERVICES) --seconds $(SECONDS) --reps $(REPS) \
	  --contenders $(CONTENDERS) --modes $(MODES) --out $(E2E_OUT) --install-timeout $(INSTALL_TIMEOUT)

# Where a packet's time goes: the XDP filter (timed by the kernel, needs root), xlb's stages
# (criterion, one run) and the rest of the end-to-end figure recorded by bench-e2e, as stacked
# bars per packet for established and new flows; writes bench/results/budget.{md,svg,json}.
bench-budget: deps toolchain
	$(CARGO) build -q --release -p xlb-bench --bin filter-cost
	$(CARGO) bench -q -p xlb-bench --bench path -- 'stages|worker|decide/new-flow$$'
	$(SUDO) python3 bench/budget.py --e2e $(E2E_OUT)/e2e.json --out $(E2E_OUT)

# xlb on a node (its node: link) against kube-proxy's nftables path for a pod's traffic to a
# ClusterIP on another node, and the node's own request latency (needs root); writes
# bench/results/node.md.
bench-node: deps toolchain
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(BENCH_PACKAGES)"
	$(CARGO) build --release -p xlb-pktgen
	$(BUILD_XLB)
	$(SUDO) python3 bench/node.py

# New connections during and after a SYN flood, and an established download's longest pause:
# xlb against nftables + conntrack in one run (needs root); writes bench/results/flood.md.
bench-flood: deps toolchain
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(BENCH_PACKAGES)"
	$(CARGO) build --release -p xlb-pktgen
	$(BUILD_XLB)
	$(SUDO) python3 bench/flood.py $(XLB) target/release/xlb-pktgen
