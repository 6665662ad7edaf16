# Weft developer targets. `make test` is what CI runs (.ci/run).
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: build image image-debs image-docker test test-apiserver e2e fmt fmt-check lint crds manifests bench bench-compile bench-webhook bench-operator bench-proxy proxy-order fuzz-smoke

build:
	$(CARGO) build --release --bin weft --bin weft-proxy --bin weft-demo

# The image: the crate version is its tag and the chart's appVersion.
WEFT_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
WEFT_IMAGE := ghcr.io/weft-mesh/weft:$(WEFT_VERSION)

## the image as an OCI archive, no container engine: target/image/weft-$(WEFT_VERSION).oci.tar (needs Debian/Ubuntu: apt-get, dpkg-deb, strip)
image: build image-debs
	$(CARGO) run --quiet --bin weft-image -- build --binaries target/release \
	  --debs target/image/debs --work-dir target/image/bin --out target/image/weft-$(WEFT_VERSION).oci.tar

## the Debian packages the image holds (iptables and what it loads), downloaded once into target/image/debs
image-debs:
	$(CARGO) run --quiet --bin weft-image -- debs --dir target/image/debs

## the same image with Docker (e2e/Dockerfile), tagged $(WEFT_IMAGE)
image-docker:
	docker build -f e2e/Dockerfile --build-arg WEFT_VERSION=$(WEFT_VERSION) -t $(WEFT_IMAGE) .

## fmt check + clippy (-D warnings) + every test tier that runs here (tests/image.rs needs image-debs)
test: fmt-check lint image-debs
	$(CARGO) test --all-targets
	$(CARGO) test --doc
	@# The tier 4 and 5 prerequisite checks again, output shown, so a skip is visible.
	$(CARGO) test --test netns --test apiserver -- --nocapture tier4_prerequisites tier5 2>&1 | grep -E 'SKIPPED|\*\*\*|test result' || true

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings

## tier 5: a real kube-apiserver and etcd from $$KUBEBUILDER_ASSETS (setup-envtest); fails, naming what is missing, without them
## (CRDs installed without warnings, the API server's own validation, the control plane under its manifests' RBAC, injection through the real admission chain)
test-apiserver:
	@if [ -z "$$KUBEBUILDER_ASSETS" ] || [ ! -x "$$KUBEBUILDER_ASSETS/kube-apiserver" ] || [ ! -x "$$KUBEBUILDER_ASSETS/etcd" ]; then \
	  echo "test-apiserver: KUBEBUILDER_ASSETS must point at kube-apiserver and etcd binaries"; \
	  echo "  go install sigs.k8s.io/controller-runtime/tools/setup-envtest@latest"; \
	  echo "  export KUBEBUILDER_ASSETS=\$$(setup-envtest use -p path)"; \
	  exit 1; fi
	@# Which versions ran, for the log; a failing test prints the API server's and etcd's last log lines.
	@"$$KUBEBUILDER_ASSETS/kube-apiserver" --version; "$$KUBEBUILDER_ASSETS/etcd" --version | head -n 1
	$(CARGO) test --test apiserver -- --nocapture

## tier 6: the whole system in a kind cluster with the demo shop (needs docker, kind, kubectl, helm, python3; exits 2 naming what is missing)
e2e:
	bash e2e/run.sh

## regenerate manifests/ from charts/weft with its default values (needs helm; a test fails when they differ)
manifests:
	WEFT_UPDATE_MANIFESTS=1 $(CARGO) test --quiet --test manifests manifests_are_the_chart_rendered

## regenerate crds/, the chart's copy and manifests/05-crds.yaml from the Rust types (a test fails when they differ)
crds:
	$(CARGO) run --quiet --bin weft -- crdgen --out-dir crds
	mkdir -p charts/weft/crds && rm -f charts/weft/crds/*.yaml && cp crds/*.yaml charts/weft/crds/
	$(MAKE) manifests

bench: bench-compile bench-webhook bench-operator

## policy compiler: compile time and config size -> bench/results/compile.md
bench-compile:
	$(CARGO) bench --bench compile

## admission webhook: AdmissionReview latency in process and over HTTPS -> bench/results/webhook.md
bench-webhook:
	$(CARGO) bench --bench webhook

## operator: convergence after a change with 100 and 1000 namespaces, API requests per reconcile -> bench/results/operator.md
bench-operator:
	$(CARGO) bench --bench operator

## proxy: latency added per hop vs nginx and haproxy (~12 min) -> bench/results/proxy.md
bench-proxy:
	CARGO="$(CARGO)" bash bench/proxy/run.sh

## regenerate src/bin/weft-proxy.order, the sidecar's hot functions for the linker to pack together (needs valgrind)
proxy-order:
	CARGO="$(CARGO)" bash bench/proxy/order.sh

## fuzz the proxy's wire parsing, the inbound path's decisions (detection, head, authorization), the admission webhook, and probe paths and SPIFFE ids, 60 s each (needs cargo-fuzz; `make test` runs the same bodies over fuzz/seeds/ in tests/fuzz_seeds.rs)
FUZZ_SECONDS ?= 60
fuzz-smoke:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	mkdir -p fuzz/corpus/proxy_detect_http fuzz/corpus/probe_paths_and_ids
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run proxy_detect_http corpus/proxy_detect_http seeds/proxy_detect_http -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
	mkdir -p fuzz/corpus/webhook_admission
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run webhook_admission corpus/webhook_admission seeds/webhook_admission -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run probe_paths_and_ids corpus/probe_paths_and_ids seeds/probe_paths_and_ids -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
	mkdir -p fuzz/corpus/inbound_path
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run inbound_path corpus/inbound_path seeds/inbound_path -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
