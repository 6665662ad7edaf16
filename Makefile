# Weft developer targets. `make test` is what CI runs (.ci/run).
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: build test fmt fmt-check lint crds bench bench-compile bench-proxy fuzz-smoke

build:
	$(CARGO) build --release --bin weft

## fmt check + clippy (-D warnings) + every test tier that runs here
test: fmt-check lint
	$(CARGO) test --all-targets
	$(CARGO) test --doc

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings

## regenerate crds/ from the Rust types (a test fails when they differ)
crds:
	$(CARGO) run --quiet --bin weft -- crdgen --out-dir crds

bench: bench-compile

## policy compiler: compile time and config size -> bench/results/compile.md
bench-compile:
	$(CARGO) bench --bench compile

## proxy: latency added per hop vs nginx and haproxy (~12 min) -> bench/results/proxy.md
bench-proxy:
	CARGO="$(CARGO)" bash bench/proxy/run.sh

## fuzz the proxy's wire parsing for 60 s (needs cargo-fuzz; not part of `make test`)
FUZZ_SECONDS ?= 60
fuzz-smoke:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run proxy_detect_http -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
