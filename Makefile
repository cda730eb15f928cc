# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# config/serve.env: the environment Ray Serve runs in, for `make run` as for the tests and the benchmark.
# A variable already set in your environment (or on make's command line) wins.
SERVE_ENV := $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=\(.*\)$$/\1=\2/p' config/serve.env)
$(foreach kv,$(SERVE_ENV),$(eval $(firstword $(subst =, ,$(kv))) ?= $(patsubst $(firstword $(subst =, ,$(kv)))=%,%,$(kv))))
export $(foreach kv,$(SERVE_ENV),$(firstword $(subst =, ,$(kv))))

.PHONY: run reload test lint install models unit integration cluster lifecycle bench clean

# `serve run $(SERVE_CONFIG)` under serve_app/launch.py: Ctrl-C, TERM (to make or its process group) and HUP
# (to the group, from a closed terminal) stop everything it started, HAProxy included, before make returns;
# a run that finds what a killed one left (its PID file, .run/) clears it; a port held by anything else is
# named in one line (docs/operations.md).
SERVE_CONFIG ?= serve_config.yaml
run: install models
	$(PY) -m serve_app.launch $(SERVE_CONFIG)

# Deploys an edited config/models.json to the app `make run` (or `serve deploy`) runs, without restarting
# a replica: checks it, writes it into $(SERVE_CONFIG)'s deployments as their user_config, `serve deploy`s
# that, and waits for `serve status`. A bad registry is refused with the messages of start-up; nothing changes.
# RAY_DASHBOARD_ADDRESS (default http://localhost:8265) names another cluster. It installs nothing (the venv only
# where there is none): the running app imports from that venv, so a pull that changed pyproject.toml does not
# reinstall beneath it; `make install` does that, and `make run` starts the app again.
reload:
	@test -f $(STAMP) || $(MAKE) --no-print-directory install
	$(PY) -m serve_app.reload $(SERVE_CONFIG)

# Three pytest sessions: one node for unit and integration tests, then a three-node cluster
# (ray.cluster_utils) for the cluster tests, each starting Ray once; then `make run` itself, started and
# stopped three times (as root, in a network namespace of its own).
test: install models lint
	$(PY) -m pytest tests/unit tests/integration
	$(PY) -m pytest tests/cluster
	$(PY) -m pytest tests/lifecycle

# ruff: the linter and formatter configured in pyproject.toml (`ruff format .` fixes the formatting).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: install
	$(PY) -m pytest tests/unit

# Every benchmark scenario against the running app, side by side with its peers (several minutes):
# writes docs/benchmarks.md and docs/bench/*.png.
bench: install models
	$(PY) -m bench.run --out docs --runs 3

integration: install models
	$(PY) -m pytest tests/integration

cluster: install
	$(PY) -m pytest tests/cluster

lifecycle: install models
	$(PY) -m pytest tests/lifecycle

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	bash scripts/install-torch.sh $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[demo,test,bench]"
	touch $@

# Trains the demo models into models/ (git-ignored); skipped when up to date.
models: install
	$(PY) -m demo.build_models

clean:
	rm -rf $(VENV) models .pytest_cache
