# guard — the two commands a newcomer needs: `make demo` and `make test`.
# Both install what is missing on Debian 12 (as root) and never touch the host's own ruleset.

SHELL := /bin/bash
CARGO ?= cargo
APT_PACKAGES := nftables libnftnl-dev libmnl-dev pkg-config iproute2 conntrack \
	unbound dnsutils knot-dnsutils dnsperf nsd curl openssl ncat socat sqlite3 \
	systemd python3 gcc libc6-dev

.PHONY: deps build release test test-unit test-e2e lint demo bench bench-fwd clean

## deps: install the Debian packages the tests and the demo need (idempotent)
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust >= 1.88 (rustup)"; exit 1; }
	@command -v cargo-deb >/dev/null || { echo "installing cargo-deb (packaging test and make deb)"; $(CARGO) install cargo-deb --locked --quiet; }

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --release --workspace --bins

## test: every test, unit and end-to-end (network namespaces, real nftables, SQLite, unbound). Needs root.
## One release build serves the tests, the end-to-end binaries and the package check.
test: release
	$(CARGO) test --release --workspace --no-fail-fast -- --test-threads=2

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## demo: the real system in a throwaway network namespace
demo: release
	./scripts/demo.sh

## bench: fwd Authorize benchmark against the peers' `nft` exec, in a private namespace
bench: bench-fwd
bench-fwd: deps
	./bench/fwd.sh

clean:
	$(CARGO) clean

## deb: build the Debian package target/debian/guard_*.deb (dist build: fat LTO; completions, man pages, cargo-deb)
.PHONY: deb
deb: deps
	./scripts/package.sh
