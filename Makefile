# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUNDLE := $(VENV)/bin/bundle
DEMO_ROOT ?= demo-target
# Reproducible demo bundles: the same commit gives the same bytes (and a no-op re-install).
export SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 1700000000)

.PHONY: venv demo demo-stop test test-fast host-setup lint bench bench-delta bench-scale bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	@mkdir -p demo-keys
	@test -f demo-keys/demo.key || $(BUNDLE) keygen demo-keys/demo
	$(BUNDLE) build profiles/demo.yaml --key demo-keys/demo.key --out dist
	$(BUNDLE) install dist/demo-1.0.0.bundle --trust demo-keys/demo.pub --root $(DEMO_ROOT)
	$(BUNDLE) status --root $(DEMO_ROOT)
	@echo "demo is healthy: http://127.0.0.1:8765/  (stop it with: make demo-stop)"

demo-stop: venv
	$(BUNDLE) stop --root $(DEMO_ROOT)

test: venv host-setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The loop to run while working (docs/testing.md): every test that needs no engine, database,
# network or namespace, on FAST_JOBS workers (pytest-xdist; a module's tests stay together so
# its module fixtures are built once). Under 2 minutes on 2 idle cores.
FAST_MARKERS := not docker and not postgres and not mariadb and not network and not slow and not netns
FAST_JOBS ?= 2
test-fast: venv
	$(PY) -m pytest -q -m '$(FAST_MARKERS)' -n $(FAST_JOBS) --dist loadfile $(PYTEST_ARGS)

# The services the suite needs on this host (Docker engine, skopeo, a local registry).
host-setup:
	@if [ "$$(id -u)" = 0 ]; then bash scripts/ci-host-setup.sh; \
	else echo "not root: skipping host setup; docker tests will be skipped (failed under CI=true)"; fi

lint: venv
	$(VENV)/bin/ruff check bundler scripts tests
	$(VENV)/bin/mypy
	$(PY) scripts/lint_kit.py  # the target kit's modules as Python 3.9 (issue 22)

# bundler against the manual checklist, one run (issue 12); results + chart in bench/results/
bench: venv
	$(PY) scripts/bench.py --out bench/results
	$(PY) scripts/bench_delta.py --out bench/results

# only the delta bundles' part (issue 19): bench/results/bench-delta.json
bench-delta: venv
	$(PY) scripts/bench_delta.py --out bench/results

# bundler at 0.5, 1, 2 and 5 GiB of images (issue 19; ~20 min, ~25 GB of disk at 5 GiB):
# bench/results/bench-scale.json
bench-scale: venv
	$(PY) scripts/bench_scale.py --out bench/results

# a small workload (no network, about a minute here): what tests/test_bench.py runs in CI
bench-quick: venv
	$(PY) scripts/bench.py --quick
	$(PY) scripts/bench_delta.py --quick
	$(PY) scripts/bench_scale.py --quick

clean:
	-test -x $(BUNDLE) && test -d $(DEMO_ROOT) && $(BUNDLE) stop --root $(DEMO_ROOT)
	rm -rf dist $(DEMO_ROOT) build *.egg-info
