# The two commands a newcomer needs: `make lab` (build and prove a local encrypted cluster)
# and `make test` (the whole suite; .ci/run calls exactly this). Both run `make setup` first,
# which is quick when nothing changed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup lab lab-down test test-unit test-integration test-e2e lint bench bench-full

setup:
	bash scripts/setup.sh

# A 3-node cluster of real kubelets on this machine with the Helm chart installed
# (encryption.enabled=true), then the proof: every pod pair over ICMP and TCP, zero
# plaintext on the underlay, and the sanity inversion. Repeating it is harmless.
lab: setup
	$(VENV)/bin/wgmanager lab up --nodes 3
	$(VENV)/bin/wgmanager lab check

lab-down:
	$(VENV)/bin/wgmanager lab down

# Runs setup when needed (setup is quick when nothing changed), then the whole suite.
test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

test-e2e: setup
	$(PY) -m pytest tests/e2e

lint: setup
	$(VENV)/bin/ruff check wgmanager tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Benchmarks quoted in docs/benchmarks.md: one table on stdout, bench/results.json on disk.
# `bench` takes a few minutes on 2 cores; `bench-full` is longer (more samples, 5,000 nodes).
# BENCH_ARGS passes options on, e.g. `make bench BENCH_ARGS=--profile` (where the CPU goes).
bench: setup
	$(PY) bench/run.py $(BENCH_ARGS)

bench-full: setup
	$(PY) bench/run.py --full $(BENCH_ARGS)
