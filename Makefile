# bktbayes: `make demo` runs the main job on the bundled data, `make test` the tests.
# Both create .venv from a Python >= 3.12 found by .ci/find-python and install the package.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench venv clean

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

test: $(STAMP)
	$(VENV)/bin/ruff check bktbayes tests benchmarks
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check bktbayes tests benchmarks
	$(VENV)/bin/ruff format --check bktbayes tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format bktbayes tests benchmarks
	$(VENV)/bin/ruff check --fix bktbayes tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_replay.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
