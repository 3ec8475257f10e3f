# xlb — the two commands of the quick start are `make demo` and `make test`.
# Both install the Debian packages they need first, so a fresh Debian 12 machine with a stable
# Rust toolchain needs nothing else.

SHELL := /bin/bash
CARGO ?= cargo
APT_PACKAGES := clang llvm libelf-dev zlib1g-dev pkg-config m4 iproute2 ethtool
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
XLB := target/release/xlb
FRAMES := deploy/examples/frames

.PHONY: all deps toolchain build demo test lint loom bench

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

build: deps toolchain
	$(CARGO) build --release --workspace

# What exists today is the packet layer: the demo translates sample frames with the same code
# the workers will run, and prints each before and after, layer by layer.
demo: build
	@echo "== xlb demo: the packet layer (parse, NAT rewrite, incremental checksums)"
	@echo "== The AF_XDP dataplane that forwards real traffic is not built yet; these are frames, not a network."
	@echo
	@echo "-- 1. A TCP SYN from a client to the Service VIP 198.18.64.1:80, DNATed to backend 198.18.128.2:8080"
	$(XLB) rewrite --dst 198.18.128.2:8080 --eth-src 02:00:00:00:01:02 --eth-dst 02:00:00:00:02:02 $$(cat $(FRAMES)/tcp-syn-to-vip.hex)
	@echo
	@echo "-- 2. A UDP datagram whose sender left only the pseudo-header checksum (veth tx offload): it leaves complete"
	$(XLB) rewrite --dst 198.18.128.2:5353 $$(cat $(FRAMES)/udp-partial-checksum.hex)
	@echo
	@echo "-- 3. A router's 'fragmentation needed' about a DNATed segment: outer and quoted headers are un-NATed"
	$(XLB) rewrite --src 198.18.64.1:80 $$(cat $(FRAMES)/icmp-frag-needed.hex)

lint: deps toolchain
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Loom models of the flow table: a separate build with --cfg loom, so its own target dir.
# Two preemptions per execution bound the search (each model covers a two-thread race).
loom: deps toolchain
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 \
	  $(CARGO) test --release -p xlb-dataplane --test flow_loom

# Everything: formatting, lints, the dataplane alone without test utilities, every test, and
# the loom models.
test: lint
	$(CARGO) check -p xlb-dataplane
	$(CARGO) test --workspace
	$(MAKE) --no-print-directory loom

# Criterion stages, then their medians per packet; bench/callgrind.sh gives instruction counts
# that do not depend on how busy the machine is.
bench: deps toolchain
	$(CARGO) bench -p xlb-bench
	$(CARGO) run -q --release -p xlb-bench --bin bench-summary
