# Scale0: `make run` starts the whole stack, `make test` runs the suite.
# Both install what is missing: the .venv, and Debian's mongrel2-core (as root);
# `make test` also Debian's chromium and chromium-driver, for the status page test,
# and nftables, for the packet-loss case of the many-hosts tests (as root only:
# those tests need root for network namespaces and skip without it).
# `make bench` (docs/benchmarks.md) also installs Debian's wrk and nginx and the
# `bench` extras (gunicorn, granian, py-spy); `make bench-long` runs the memory
# and connection checks, `make profile` profiles the hot path with py-spy.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
CONFIG ?= scale0.toml

.PHONY: run test unit integration e2e lint bench bench-long profile deps mongrel2 browser nftables wrk nginx clean

run: deps
	$(BIN)/scale0 up --config $(CONFIG) --exit-with-parent

test: deps browser nftables
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: deps
	$(BIN)/python -m pytest -q tests/integration

e2e: deps browser nftables
	$(BIN)/python -m pytest -q tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check scale0 tests examples bench
	$(BIN)/mypy scale0

bench: deps wrk nginx $(BENCH_STAMP)
	$(BIN)/python -m bench.run

bench-long: deps wrk $(BENCH_STAMP)
	$(BIN)/python -m bench.long

profile: deps wrk $(BENCH_STAMP)
	$(BIN)/python -m bench.profile

# gunicorn, granian, uvicorn (the peers) and py-spy: only the benchmarks need them.
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	@touch $@

deps: $(STAMP) mongrel2

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Scale0 needs Python >= 3.11 ($(PYTHON) is older); set PYTHON=python3.11" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  { echo "error: could not create $(VENV); on Debian: apt-get install python3-venv" >&2; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# mongrel2-core gives `mongrel2` and `m2sh`; installed with apt-get when we are root.
mongrel2:
	@command -v mongrel2 >/dev/null && command -v m2sh >/dev/null || $(MAKE) --no-print-directory apt-mongrel2-core

# The status page test drives Debian's chromium through chromedriver (selenium);
# chromium-driver depends on chromium, so one install brings both.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || $(MAKE) --no-print-directory apt-chromium-driver

nftables:
	@command -v nft >/dev/null || [ "$$(id -u)" != 0 ] || $(MAKE) --no-print-directory apt-nftables

wrk:
	@command -v wrk >/dev/null || $(MAKE) --no-print-directory apt-wrk

# Debian's nginx: the front of both peers in `make bench` (it lives in /usr/sbin).
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || $(MAKE) --no-print-directory apt-nginx

apt-%:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $* with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $* >/dev/null; \
	else \
	  echo "error: '$*' is missing. Install it as root: apt-get install $*" >&2; exit 1; \
	fi

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis
