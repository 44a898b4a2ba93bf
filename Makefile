# The two commands of the README. Both create the local virtual environment first if it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help run test test-fast lint format install browser prometheus wrk bench clean-stack

run: install  ## (1) train on the packaged default, promote the winner, serve the champion on loopback
	$(BIN)/textclf train
	$(BIN)/textclf promote
	$(BIN)/textclf serve

# The whole suite on the machine's cores (pytest-xdist, at most 4 workers), a test file per worker at a time: a file's
# module fixtures (its servers) start once. `.venv/bin/pytest` alone runs it in one process.
test: install browser prometheus wrk lint  ## (2) lint, types and the whole test suite (no network needed at test time)
	$(BIN)/pytest -n auto --maxprocesses 4 --dist loadfile

test-fast: install  ## the fast lane: the unit tier, no real servers (`pytest -m unit`, about 1 min)
	$(BIN)/pytest -m unit

lint: install  ## ruff (lint + format check), import-linter (the direction of imports), mypy (strict on tasks/; flows/ and service.py too)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

format: install  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:[^#]*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## the virtual environment .venv, from constraints.txt (about 2 min)

$(VENV)/.installed: pyproject.toml constraints.txt requirements-packaged.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-packaged.txt
	touch $@

# The browser journeys drive Debian's Chromium through Playwright (never Playwright's own browser download).
browser:  ## Debian's Chromium for the browser journeys (apt, once)
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "Installing Debian's chromium for the browser tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The monitoring test (tests/test_monitoring_dashboards.py) asks a real Prometheus every PromQL query of the Grafana
# dashboard: Debian's package ships `prometheus` and `promtool`. Installed without starting its system service (a
# policy-rc.d that denies it, if the machine has none) and without the recommended node exporter.
prometheus:  ## Debian's prometheus + promtool for the dashboard test (apt, once)
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "Installing Debian's prometheus (prometheus, promtool) for the monitoring dashboard test"; \
	  POLICY=; [ -e /usr/sbin/policy-rc.d ] || { POLICY=/usr/sbin/policy-rc.d; \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee $$POLICY >/dev/null && $$SUDO chmod +x $$POLICY; }; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null; STATUS=$$?; \
	  [ -z "$$POLICY" ] || $$SUDO rm -f $$POLICY; \
	  command -v systemctl >/dev/null 2>&1 && $$SUDO systemctl disable --now prometheus >/dev/null 2>&1; \
	  exit $$STATUS; }

# The overload benchmark (bench/overload.py) loads the service with an independent load generator, wrk (Debian's
# package); its smoke test in tests/test_bench.py runs it for a second.
wrk:  ## Debian's wrk, the independent load generator of bench/overload.py (apt, once)
	@command -v wrk >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "Installing Debian's wrk for the overload benchmark"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; }

bench: install  ## fine-tune throughput: our task against a plain transformers Trainer
	$(BIN)/python bench/fine_tune_throughput.py

clean-stack:  ## stop the embedded Prefect and MLflow servers
	-$(BIN)/textclf stack down
