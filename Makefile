# handoff — build, run, test, bench.
#   make          release binary, examples, C client, libhandoff
#                 (build/libhandoff.{a,so}) and the C example workers
#                 (installs system packages first)
#   make run      pair demo: two servers, unary + stream clients, stop
#   make demo-hosts  (root) 3 network namespaces as hosts, etcd, a node on each,
#                 relays between every pair of workers, the link tables
#   make test     cargo test (unit + integration) incl. the C client check
#                 and the C workers (tests/it/cworker.rs)
#   make bench    every benchmark (bench-pair, bench-cluster, bench-nodes, bench-restart,
#                 bench-http, bench-rebalance, bench-scale); each writes bench/results/NAME.md and NAME.svg
#                 and exits non-zero when a target is missed
#   make memcheck unit tests, some integration tests and two nodes under valgrind
#   make chaos    soak: load + restarts + kills, every request accounted for
#                 (CHAOS_SECS=300; `make chaos-ci` is the 30 s form)
CARGO   ?= cargo
CC      ?= cc
CFLAGS  ?= -O2 -Wall -Wextra -std=c11 -D_GNU_SOURCE
BIN     := target/release/handoff
# libhandoff and the C workers on it (examples/c/).
C_ARTIFACTS := build/libhandoff.a build/libhandoff.so build/rpc_worker build/echo_worker build/echo_worker_so
C_LDLIBS = $(shell pkg-config --libs libevent) -lpthread -ldl -lm
# make chaos: seconds of load and faults; every other knob is a CHAOS_* env
# var or a flag (scripts/chaos.py --help), e.g. make chaos CHAOS_HELD=8000.
CHAOS_SECS ?= 300
# Debian packages the build needs: libevent (linked via pkg-config), libclang
# (bindgen), a C compiler; curl for the http tests; systemd-socket-activate
# (package systemd) and unshare (util-linux) for the operations tests; ip
# (iproute2) for make demo-hosts and the namespace test; etcd
# (etcd-server) for the etcd membership tests.
DEB_PKGS := libevent-dev libclang-dev clang pkg-config gcc make curl systemd util-linux iproute2 etcd-server
# What make memcheck needs on top.
MEMCHECK_PKGS := valgrind
# What the benchmarks need on top: load generator, yardsticks, plots.
BENCH_PKGS := nginx wrk gnuplot-nox nodejs

.PHONY: install install-only all deps memcheck-deps bench-deps build run demo demo-nodes demo-hosts test memcheck bench bench-pair bench-cluster bench-nodes bench-restart bench-http bench-rebalance bench-scale chaos chaos-ci clean

all: deps build

# Installs the missing Debian packages among $(1) when root; otherwise
# prints the command and fails.
define apt_install
	@missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make deps: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "make deps: missing packages:$$missing" >&2; \
	    echo "run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi
endef

deps:
	$(call apt_install,$(DEB_PKGS))

memcheck-deps:
	$(call apt_install,$(MEMCHECK_PKGS))

# apt_install's rules, plus: no system nginx is started or left enabled.
bench-deps: deps
	@scripts/bench-deps.sh $(BENCH_PKGS)

build: deps $(BIN) build/cclient $(C_ARTIFACTS)

# The handoff binary and the examples (target/release/examples/{http,shout}).
$(BIN): FORCE
	$(CARGO) build --release --bins --examples

build/cclient: csrc/cclient.c
	@mkdir -p build
	$(CC) $(CFLAGS) -pthread -o $@ $<

# libhandoff (capi/, the C API of csrc/handoff.h) as build/libhandoff.{a,so};
# copied only when cargo rebuilt them, replaced atomically (a running
# worker may have the .so mapped).
build/libhandoff.a: FORCE
	$(CARGO) build --release -p handoff-c
	@mkdir -p build
	@cmp -s target/release/libhandoff_c.a $@ || { cp target/release/libhandoff_c.a $@.tmp && mv -f $@.tmp $@; }

build/libhandoff.so: build/libhandoff.a
	@cmp -s target/release/libhandoff_c.so $@ || { cp target/release/libhandoff_c.so $@.tmp && mv -f $@.tmp $@; }

# The C example workers, linked statically against libhandoff (they run
# without LD_LIBRARY_PATH); echo_worker_so checks the shared library
# (found next to it through its rpath). Callbacks leave parameters unused.
C_EXAMPLE_FLAGS = $(CFLAGS) -Wno-unused-parameter -Icsrc
build/rpc_worker build/echo_worker: build/%: examples/c/%.c csrc/handoff.h build/libhandoff.a
	$(CC) $(C_EXAMPLE_FLAGS) -o $@ $< build/libhandoff.a $(C_LDLIBS)

build/echo_worker_so: examples/c/echo_worker.c csrc/handoff.h build/libhandoff.so
	$(CC) $(C_EXAMPLE_FLAGS) -o $@ $< -Lbuild -lhandoff -Wl,-rpath,'$$ORIGIN' $(C_LDLIBS)

build/pair_epoll: bench/pair_epoll.c
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ $<

# The C yardstick for cluster mode: 2 forked epoll workers, SO_REUSEPORT.
build/cluster_epoll: bench/cluster_epoll.c
	@mkdir -p build
	$(CC) $(CFLAGS) -o $@ $<

run demo: build
	scripts/demo-pair.sh

demo-nodes: build
	scripts/demo-nodes.sh

# As root: 3 network namespaces as hosts (bridge + veths), etcd, a node on
# each, relays between every pair of workers, the link tables.
demo-hosts: build
	scripts/demo-hosts.sh

# The integration tests run target/release/examples/{http,shout}: `cargo
# test` alone builds examples only as test harnesses, so build them first.
test: deps build/cclient $(C_ARTIFACTS)
	$(CARGO) build --release --bins --examples
	$(CARGO) test --release

# Valgrind (memcheck) over the unit tests, a set of integration tests with
# every handoff process under valgrind, and two nodes: 0 errors or it fails.
memcheck: deps memcheck-deps $(C_ARTIFACTS)
	scripts/memcheck.sh

bench: bench-pair bench-cluster bench-nodes bench-restart bench-http bench-rebalance bench-scale

bench-pair: bench-deps build build/pair_epoll
	scripts/bench-pair.sh

bench-cluster: bench-deps build build/cluster_epoll
	scripts/bench-cluster.sh

bench-nodes: bench-deps build
	scripts/bench-nodes.sh

bench-restart: bench-deps build
	scripts/bench-restart.sh

# Cost against N idle connections (1k, 10k, 50k, 100k; the sizes the
# descriptor limits allow): restart time, memory per connection (user and
# kernel), accept rate, keep-alive p99; also bench/results/bench-scale.svg
# (log-log, each cost against N).
bench-scale: bench-deps build
	scripts/bench-scale.sh

# The http example vs nginx vs Node's http + cluster (BENCH_SECS per run).
bench-http: bench-deps build
	scripts/bench-http.sh

# Live rebalancing: a skewed CPU load (only worker 0's connections busy)
# without and with --rebalance and on Node's cluster, an even one without and
# with; also writes bench/results/bench-rebalance-time.{svg,tsv} (per worker
# over time).
bench-rebalance: bench-deps build
	scripts/bench-rebalance.sh

# Exit status 1 on any unexplained lost connection/reply or finding.
chaos: build
	python3 scripts/chaos.py --secs $(CHAOS_SECS)

# The short form for CI: 30 s, same load and faults.
chaos-ci: build
	python3 scripts/chaos.py --secs 30

# make install PREFIX=/usr/local [DESTDIR=...]: the binary, the C header
# and libraries, the systemd units (ExecStart pointing at PREFIX) and a
# sample config. `install-only` copies what `make` built, nothing more.
PREFIX  ?= /usr/local
DESTDIR ?=
install: build
	$(MAKE) --no-print-directory install-only PREFIX=$(PREFIX) DESTDIR=$(DESTDIR)

install-only:
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/handoff
	install -D -m 0644 csrc/handoff.h $(DESTDIR)$(PREFIX)/include/handoff.h
	install -D -m 0644 build/libhandoff.a $(DESTDIR)$(PREFIX)/lib/libhandoff.a
	install -D -m 0755 build/libhandoff.so $(DESTDIR)$(PREFIX)/lib/libhandoff.so
	@mkdir -p $(DESTDIR)$(PREFIX)/lib/systemd/system
	for u in handoff.service handoff.socket; do \
	  sed 's|@PREFIX@|$(PREFIX)|g' contrib/systemd/$$u > $(DESTDIR)$(PREFIX)/lib/systemd/system/$$u || exit 1; \
	done
	install -D -m 0644 contrib/handoff.toml $(DESTDIR)$(PREFIX)/share/doc/handoff/handoff.toml.example
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/handoff/README.md

clean:
	$(CARGO) clean
	rm -rf build run

FORCE:
