# bktbayes: `make demo` runs the main job on the bundled data, `make test` the tests.
# Both create .venv from a Python >= 3.12 found by .ci/find-python and install the package.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PHONY_NB := notebooks-full
.PHONY: $(PHONY_NB) demo test test-fast lint format bench bench-serving serve venv clean

$(STAMP): pyproject.toml
	@set -e; \
	if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then \
	  rm -rf $(VENV); \
	  base=$$(.ci/find-python); \
	  echo "creating $(VENV) with $$base"; \
	  $$base -m venv $(VENV); \
	fi; \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet -e '.[dev]'; \
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bktbayes demo --out demo_out

# Runs CMD with BKTBAYES_TEST_PG_URL set: a throwaway PostgreSQL server on a free
# loopback port and a temporary data directory (.ci/pg), stopped and removed afterwards.
# An already exported BKTBAYES_TEST_PG_URL is used as it is.
define with_pg
	@set -e; \
	if [ -n "$$BKTBAYES_TEST_PG_URL" ]; then $(1); exit; fi; \
	dir=$$(mktemp -d /tmp/bktbayes-pg.XXXXXX); \
	port=$$($(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	trap '.ci/pg stop '"$$dir"' || true; rm -rf '"$$dir" EXIT; \
	url=$$(.ci/pg start $$dir $$port); echo "PostgreSQL for the tests: $$url"; \
	export BKTBAYES_TEST_PG_URL=$$url BKTBAYES_REQUIRE_PG=1; \
	$(1)
endef

test: $(STAMP)
	$(VENV)/bin/ruff check bktbayes tests benchmarks notebooks
	$(call with_pg,$(PY) -m pytest -q)
	BKTBAYES_NB_SIZE=small $(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=1200 notebooks

test-fast: $(STAMP)
	$(call with_pg,$(PY) -m pytest -q -m "not slow")

lint: $(STAMP)
	$(VENV)/bin/ruff check bktbayes tests benchmarks notebooks
	$(VENV)/bin/ruff format --check bktbayes tests benchmarks notebooks

format: $(STAMP)
	$(VENV)/bin/ruff format bktbayes tests benchmarks notebooks
	$(VENV)/bin/ruff check --fix bktbayes tests benchmarks notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_replay.py

# Serving figures: store latency, HTTP load and recalculation on PostgreSQL.
bench-serving: $(STAMP)
	$(call with_pg,$(PY) benchmarks/bench_serving.py)

# The notebooks at full size (by hand; tens of minutes).
notebooks-full: $(STAMP)
	$(PY) -m pytest -q --nbmake --nbmake-timeout=7200 notebooks

clean:
	rm -rf $(VENV) demo_out notebooks/nb_out .pytest_cache .ruff_cache
