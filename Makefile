# pgqueue developer targets. `make help` lists them.
.DEFAULT_GOAL := help
PYTHON ?= python

.PHONY: help test lint bench ci freeze

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

test: ## Install the project and run the whole test suite (the README command)
	$(PYTHON) -m pip install -e '.[dev]' && $(PYTHON) -m pytest

lint: ## ruff (lint and format check) and mypy --strict
	ruff check .
	ruff format --check .
	mypy

bench: ## Run the benchmarks in bench/
	@if [ -f bench/run.py ]; then $(PYTHON) bench/run.py; else echo "no benchmarks yet (bench/run.py)"; exit 1; fi

ci: ## Everything CI runs: tests, packaging check, lint
	.ci/run

freeze: ## Regenerate revision 0001's up SQL from sql/ (only while 0001 is unreleased)
	$(PYTHON) scripts/freeze_initial.py
