# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: run test install models unit integration cluster bench clean

# RAY_SERVE_THROUGHPUT_OPTIMIZED: Ray Serve's throughput-optimized mode (direct ingress, gRPC between
# replicas, buffered request logs); docs/benchmarks.md measures it against the standard mode.
run: install models
	RAY_SERVE_THROUGHPUT_OPTIMIZED=$${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1} $(VENV)/bin/serve run serve_config.yaml

# Two pytest sessions, each starting Ray once: one node for unit and integration tests,
# then a three-node cluster (ray.cluster_utils) for the cluster tests.
test: install models
	$(PY) -m pytest tests/unit tests/integration
	$(PY) -m pytest tests/cluster

unit: install
	$(PY) -m pytest tests/unit

# Every benchmark scenario against the running app, side by side with its peers (several minutes):
# writes docs/benchmarks.md and docs/bench/*.png.
bench: install models
	$(PY) bench/run.py --out docs

integration: install models
	$(PY) -m pytest tests/integration

cluster: install
	$(PY) -m pytest tests/cluster

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	bash scripts/install-torch.sh $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[demo,test,bench]"
	touch $@

# Trains the demo models into models/ (git-ignored); skipped when up to date.
models: install
	$(PY) demo/build_models.py

clean:
	rm -rf $(VENV) models .pytest_cache
