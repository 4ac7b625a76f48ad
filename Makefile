# k2proxy entry points. `make run` and `make test` are the README's quick start.
SHELL := /bin/bash
CARGO ?= cargo
# Installing system packages needs root; use sudo when not root and sudo exists.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: bench-peers bench-limits bench-drain peak drill soak lag fuzz deps test-deps build run test check lint bench bench-classify bench-admission bench-overhead bench-overload fleet-chart clean

## deps: install what the build needs when missing (cmake for pingora's C deps).
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
	@command -v cmake >/dev/null || { echo "installing cmake (needed to build pingora)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake >/dev/null; }
	@command -v cc >/dev/null || { echo "installing a C compiler"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq build-essential >/dev/null; }

## build: release binaries k2proxy, legacy-sim, loadtest.
build: deps
	$(CARGO) build --release --bins

## run: three legacy-sim backends and k2proxy with the repo's routes.toml; Ctrl-C stops all.
run: build
	@scripts/run.sh

## test-deps: what the tests drive besides k2proxy (headless Chromium for the status page,
## Prometheus and promtool for the dashboards and alerts, redis-server for fleet rate limits).
test-deps: deps
	@command -v chromium >/dev/null || { echo "installing chromium (headless, for the status-page test)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@command -v promtool >/dev/null || { echo "installing prometheus (for the dashboard and alert tests)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq prometheus >/dev/null; }
	@command -v redis-server >/dev/null || { echo "installing redis-server (for the fleet rate-limit tests)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

## test: formatting, lints, every test, and the repo's own config files.
test: test-deps lint
	$(CARGO) test --workspace --all-targets
	# The vendored pingora-http's own tests, with our additions (vendor/README.md).
	CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) test -q --manifest-path vendor/pingora-http/Cargo.toml
	$(CARGO) run -q --bin k2proxy -- check --routes routes.toml
	$(CARGO) run -q --bin k2proxy -- check --routes routes.toml --policy policies/holiday-peak.toml
	promtool check rules dashboards/alerts.yml
	cd dashboards && promtool test rules alerts_test.yml
	# The tools' own tests (scripts/test_*.py; -B: no __pycache__ left behind).
	python3 -B -m unittest discover -s scripts -p 'test_*.py' -q

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -q -- -D warnings

## check: validate routes.toml and its policy.
check: deps
	$(CARGO) run -q --bin k2proxy -- check --routes routes.toml

## bench: classification and shed-decision cost, then k2proxy against a bare pingora proxy,
## nginx and HAProxy: overhead, overload at 1x-5x, failover (about 20 minutes; results/).
bench: bench-classify bench-admission bench-peers

## bench-peers: the side-by-side comparison alone (scripts/bench_peers.py; PHASES to pick
## fleet (N instances behind an L4 balancer vs the HAProxy oracle), edge (a slowloris
## client against k2proxy and K2PROXY_B, an older build), accesslog (throughput with the
## access log on and off), tls (handshakes/s and HTTPS h1/h2 req/s against bare pingora
## with the same TLS stack and nginx), upgrade (a graceful upgrade under 0.8x, with and
## without [server] admission_state), or overhead, instructions, overload and/or failover).
PHASES ?= overhead instructions overload failover
bench-peers: build
	@for tool in nginx haproxy wrk valgrind; do command -v $$tool >/dev/null || { echo "installing $$tool"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$tool >/dev/null; }; done
	@command -v h2load >/dev/null || { echo "installing h2load (nghttp2-client)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nghttp2-client >/dev/null; }
	$(CARGO) build --release -q --example bare_pingora
	python3 scripts/bench_peers.py $(PHASES)

bench-admission: deps
	$(CARGO) bench -p proxy --bench admission

## peak: the black-friday scenario (0.5x → 5x → 0.5x over 90 s) with admission on and
## off, side by side; prints where the HTML reports are (about 4 minutes).
peak: build
	target/release/loadtest run loadtest/scenarios/black-friday.toml --compare --out target/loadtest/peak

## drill: the failover drill (the serving site killed, blackholed, answering 500s, restored
## each time), the reload storm (151 valid and broken policy edits by file, SIGHUP and
## POST /reload under 2x load) and a deploy mid-peak (one of three instances restarted at
## 3x); fails when any misses a threshold (about 3 minutes).
drill: build
	@status=0; \
	for s in failover-drill reload-storm fleet-restart; do \
	  target/release/loadtest run loadtest/scenarios/$$s.toml --out target/loadtest/drill-$$s || status=1; \
	done; exit $$status

## soak: the soak scenario repeated for SOAK (default 30m): 0.8x with 3x bursts, a reload
## every 10 s, a failover every 5 min; fails when RSS, open files, threads or the purchase
## p99 trend upward (docs/loadtest.md#soak).
SOAK ?= 30m
soak: build
	target/release/loadtest run loadtest/scenarios/soak.toml --repeat-for $(SOAK) --out target/loadtest/soak

## fleet-chart: docs/img/fleet-limits.svg, per-instance limits and the backend's queue in
## the simulator while a third instance starts into a 3x peak (scenario 14).
fleet-chart: deps
	rm -rf target/fleet-chart && mkdir -p target/fleet-chart/scenario target/fleet-chart/csv
	cp proxy/tests/data/admission/14_instance_starts_into_overload.toml target/fleet-chart/scenario/
	SIM_CSV=$(CURDIR)/target/fleet-chart/csv ADMISSION_SCENARIOS=$(CURDIR)/target/fleet-chart/scenario \
	  $(CARGO) test -q -p proxy --test admission_scenarios >/dev/null
	python3 scripts/fleet_chart.py docs/img/fleet-limits.svg \
	  "3 instances, 8 workers x 10 ms at 3x; the third starts at 8 s" \
	  "the controller in force (docs/admission.md, Fleets)" target/fleet-chart/csv/14.csv

## bench-limits: fleet-wide rate limits on Redis against per-instance ones, three k2proxy
## instances: accuracy and latency at 100, 1,000 and 10,000 req/s of one key, and the
## Redis-kill timeline (about 2 minutes; scripts/bench_fleet_limits.py, results/).
bench-limits: build test-deps
	python3 scripts/bench_fleet_limits.py

## bench-drain: leaving a fleet under 200 purchases/s, k2proxy's SIGTERM (drain_delay) against
## nginx's graceful stop: purchases failed after the signal, time to exit (scripts/bench_drain.py).
bench-drain: build
	@command -v nginx >/dev/null || { echo "installing nginx"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nginx >/dev/null; }
	python3 scripts/bench_drain.py

## lag: the load generator's own send lag at 10,000 requests/s against a legacy-sim.
lag: build
	@scripts/lag.sh

## bench-overload: k2proxy vs admission off at 1x, 2x, 3x, 5x capacity (about 3 minutes).
bench-overload: build
	@scripts/bench-overload.sh

bench-classify: deps
	$(CARGO) bench -p proxy --bench classify

bench-overhead: build
	@command -v wrk >/dev/null || { echo "installing wrk"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	@scripts/bench-overhead.sh

## fuzz: fuzz the XML-RPC methodName extractor for FUZZ_SECONDS (60) with cargo-fuzz (libFuzzer).
## The toolchain here is stable: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags.
FUZZ_SECONDS ?= 60
fuzz: deps
	@command -v cargo-fuzz >/dev/null || { echo "installing cargo-fuzz"; $(CARGO) install cargo-fuzz; }
	@mkdir -p fuzz/corpus-run
	# New inputs go to fuzz/corpus-run (not committed); the seeds are read from fuzz/corpus.
	RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run xmlrpc_extract --sanitizer none fuzz/corpus-run fuzz/corpus/xmlrpc_extract -- -max_total_time=$(FUZZ_SECONDS)

clean:
	$(CARGO) clean
