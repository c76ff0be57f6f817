# vaelab: `make run` and `make test` set everything up on a fresh machine.
# Every target documents itself with a `## ` comment; `make help` lists them.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra Hydra overrides, e.g. `make run ARGS="hydra.sweeper.n_trials=6"`.
ARGS ?=
EXP ?= quick
SEARCH ?= collapse
STUDY ?= quick
OUT ?= multirun
PORT ?= 5000
DASHBOARD_PORT ?= 8080

.DEFAULT_GOAL := help
.PHONY: help install run train sweep ui dashboard test test-fast bench lint clean-multirun

# One `make train-<name>` and `make sweep-<name>` per file of conf/experiment/, generated below
# (no copy per experiment): each entry is <experiment>:<its hparams_search space>.
EXPERIMENTS := \
	quick:quick \
	multiscale_vitals:collapse \
	lstm_vitals_baseline:lstm_baseline \
	vqvae_vitals:vqvae \
	conv_lstm_vitals:collapse \
	kmer_mlp:kmer \
	mri3d_baseline:mri3d \
	mri3d_dipvae:mri3d_dipvae \
	digits:benchmarks \
	mnist1d:benchmarks
exp_name = $(word 1,$(subst :, ,$(1)))
exp_search = $(word 2,$(subst :, ,$(1)))
# `make help` lines of an experiment: its description is line 2 of the experiment file (the
# line after `# @package _global_`), up to a `;`.
define experiment_help
printf '  %-30s %s\n' 'train-$(1)' "One run: $$(sed -n '2{s/^# *//;s/;.*//;p}' conf/experiment/$(1).yaml)"; \
printf '  %-30s %s\n' 'sweep-$(1)' 'Optuna sweep of experiment=$(1) over hparams_search=$(2)';
endef
define experiment_targets
.PHONY: train-$(1) sweep-$(1)
train-$(1): $$(STAMP)
	$$(BIN)/python -m vaelab.train experiment=$(1) $$(ARGS)
sweep-$(1): $$(STAMP)
	$$(BIN)/python -m vaelab.train --multirun experiment=$(1) hparams_search=$(2) $$(ARGS)
endef

help: ## List every target with one line each
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-30s %s\n", $$1, $$2}'
	@$(foreach pair,$(EXPERIMENTS),$(call experiment_help,$(call exp_name,$(pair)),$(call exp_search,$(pair))))

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

run: $(STAMP) ## Install, then the main job: a quick 12-trial collapse sweep on synthetic vitals (a few minutes)
	$(BIN)/python -m vaelab.train --multirun experiment=quick hparams_search=quick $(ARGS)

train: $(STAMP) ## One training run: make train EXP=multiscale_vitals ARGS="trainer.epochs=5"
	$(BIN)/python -m vaelab.train experiment=$(EXP) $(ARGS)

sweep: $(STAMP) ## An Optuna sweep: make sweep EXP=multiscale_vitals SEARCH=collapse ARGS="hydra.sweeper.n_trials=20"
	$(BIN)/python -m vaelab.train --multirun experiment=$(EXP) hparams_search=$(SEARCH) $(ARGS)

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 (PORT=...) over the project store multirun/mlflow.db
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(OUT)/mlflow.db --host 127.0.0.1 --port $(PORT)

dashboard: $(STAMP) ## Optuna dashboard on http://127.0.0.1:8080 for a study: make dashboard STUDY=collapse
	$(BIN)/optuna-dashboard $(OUT)/optuna/$(STUDY).journal --host 127.0.0.1 --port $(DASHBOARD_PORT)

test: $(STAMP) ## Install, then run the whole test suite
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## Run only the tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP) ## Print throughput of every model, share of matmul peak, loop and sweep overhead (~8 min)
	$(BIN)/python -m vaelab.bench
	$(BIN)/python -m vaelab.bench_sweep

lint: $(STAMP) ## Run ruff over the code and tests
	$(BIN)/ruff check vaelab tests

clean-multirun: ## Delete everything runs wrote under multirun/ (asks first)
	@printf 'Delete every run, the MLflow store and Optuna storage under multirun/? [y/N] '; \
	read answer; if [ "$$answer" = y ]; then find multirun -mindepth 1 ! -name README.md -exec rm -rf {} +; echo deleted; else echo kept; fi

# train-<name> and sweep-<name> for every entry of EXPERIMENTS (listed by `make help`).
$(foreach pair,$(EXPERIMENTS),$(eval $(call experiment_targets,$(call exp_name,$(pair)),$(call exp_search,$(pair)))))
