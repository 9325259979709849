# The two commands a newcomer needs: `make lab`-style main job arrives with the lab issue;
# `make setup` and `make test` are the contract CI relies on (.ci/run calls `make test`).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-unit test-integration lint clean-test

setup:
	bash scripts/setup.sh

# Runs setup when needed (setup is quick when nothing changed), then the whole suite.
test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

lint: setup
	$(VENV)/bin/ruff check wgmanager tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
