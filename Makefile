# vaelab: `make run` and `make test` set everything up on a fresh machine.
# Every target documents itself with a `## ` comment; `make help` lists them.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra Hydra overrides for `make run`, e.g. `make run ARGS="trainer.epochs=3"`.
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast bench lint clean-multirun

help: ## List every target with one line each
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch goes in first and on its own, pinned: a bare `torch` requirement on a machine without
# torch pulls a multi-GB CUDA build, while torch==2.13.0 takes the CPU wheel on this disk.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv if missing and install vaelab with pinned dependencies

run: $(STAMP) ## Install, then run the main job on the embedded defaults (synthetic vitals, SQLite MLflow store under multirun/)
	$(BIN)/python -m vaelab.train experiment=quick $(ARGS)

test: $(STAMP) ## Install, then run the whole test suite
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## Run only the tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP) ## Print train-step throughput, share of measured matmul peak, and full-loop overhead
	$(BIN)/python -m vaelab.bench

lint: $(STAMP) ## Run ruff over the code and tests
	$(BIN)/ruff check vaelab tests

clean-multirun: ## Delete everything runs wrote under multirun/ (asks first)
	@printf 'Delete every run, the MLflow store and Optuna storage under multirun/? [y/N] '; \
	read answer; if [ "$$answer" = y ]; then find multirun -mindepth 1 ! -name README.md -exec rm -rf {} +; echo deleted; else echo kept; fi
