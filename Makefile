# vaelab: `make run` and `make test` set everything up on a fresh machine.
# Every target documents itself with a `## ` comment; `make help` lists them.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra Hydra overrides, e.g. `make run ARGS="hydra.sweeper.n_trials=6"`.
ARGS ?=
EXP ?= quick
# Another search space than the experiment's own, for `make sweep`.
SEARCH ?=
STUDY ?= quick
# Where every target writes and reads (Hydra's run folders, the MLflow store, the Optuna
# journals): OUT=..., or VAELAB_OUTPUT_ROOT in the environment. Exported, so conf/paths
# (paths.output_root) and the notebooks follow it.
OUT ?= $(or $(VAELAB_OUTPUT_ROOT),multirun)
export VAELAB_OUTPUT_ROOT := $(OUT)
PORT ?= 5000
# make sweep WORKERS=N: N sweep processes on one study; make mlflow-server: its port and store.
WORKERS ?= 1
SERVER_PORT ?= 5050
SERVER_STORE ?= postgresql+psycopg://postgres@127.0.0.1:5432/vaelab_mlflow
DASHBOARD_PORT ?= 8080
# make train-ddp: processes (one GPU each, or CPU processes on gloo).
NPROC ?= 2
# make evidence: trials per data set and epochs per trial.
TRIALS ?= 12
EPOCHS ?= 20

.DEFAULT_GOAL := help
.PHONY: help install run train sweep finetune-conv_lstm train-ddp mlflow-server ui dashboard test test-fast bench evidence lint clean-multirun

# One `make train-<name>` and `make sweep-<name>` per file of conf/experiment/, generated below
# (no copy per experiment). Each experiment file names its own search space
# (`override /hparams_search: ...`), so a sweep of it needs nothing more.
EXPERIMENTS := $(sort $(basename $(notdir $(wildcard conf/experiment/*.yaml))))
# `make help` lines of an experiment: its description is line 2 of the experiment file (the
# line after `# @package _global_`), up to a `;`; its search space is read from its defaults.
define experiment_help
printf '  %-30s %s\n' 'train-$(1)' "One run: $$(sed -n '2{s/^# *//;s/;.*//;p}' conf/experiment/$(1).yaml)"; \
printf '  %-30s %s\n' 'sweep-$(1)' "Optuna sweep of experiment=$(1) over hparams_search=$$(sed -n 's/^ *- override \/hparams_search: *\([a-z0-9_]*\).*/\1/p' conf/experiment/$(1).yaml)";
endef
define experiment_targets
.PHONY: train-$(1) sweep-$(1)
train-$(1): $$(STAMP)
	$$(BIN)/python -m vaelab.train experiment=$(1) $$(ARGS)
sweep-$(1): $$(STAMP)
	$$(BIN)/python -m vaelab.train --multirun experiment=$(1) $$(ARGS)
endef

help: ## List every target with one line each
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-30s %s\n", $$1, $$2}'
	@$(foreach name,$(EXPERIMENTS),$(call experiment_help,$(name)))

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
	$(BIN)/python -m vaelab.train --multirun experiment=quick $(ARGS)

train: $(STAMP) ## One training run: make train EXP=multiscale_vitals ARGS="trainer.epochs=5"
	$(BIN)/python -m vaelab.train experiment=$(EXP) $(ARGS)

# WORKERS=N starts N ordinary sweep commands at once: they share the study (its journal file,
# or hydra.sweeper.storage=postgresql+psycopg://...), each trains one trial at a time, and
# make waits for all of them (Ctrl-C stops them all). README "Scaling out".
sweep: $(STAMP) ## An Optuna sweep of EXP over its own search space (or SEARCH=...), WORKERS=N processes: make sweep EXP=digits WORKERS=2 ARGS="hydra.sweeper.n_trials=20"
	@pids=""; for worker in $$(seq $(WORKERS)); do \
	  $(BIN)/python -m vaelab.train --multirun experiment=$(EXP) $(if $(SEARCH),hparams_search=$(SEARCH)) $(ARGS) & \
	  pids="$$pids $$!"; done; \
	trap 'kill $$pids 2>/dev/null' INT TERM; status=0; \
	for pid in $$pids; do wait $$pid || status=$$?; done; exit $$status

# Seed 003's two stages: experiment=conv_lstm_finetune starts from the newest finished run named
# conv_lstm_pretrain (trainer.init_from), which the first command records. ARGS go to both.
finetune-conv_lstm: $(STAMP) ## Seed 003's two stages: pretrain conv_lstm_vitals (run conv_lstm_pretrain), then fine-tune it with the convs frozen
	$(BIN)/python -m vaelab.train experiment=conv_lstm_vitals run_name=conv_lstm_pretrain $(ARGS)
	$(BIN)/python -m vaelab.train experiment=conv_lstm_finetune $(ARGS)

# torchrun starts NPROC ranks of one run (vaelab.distributed): DistributedDataParallel, the
# global batch trainer.batch_size split across them, rank 0 alone writing the run.
train-ddp: $(STAMP) ## One run of EXP on NPROC processes with DDP (torchrun; GPUs, or CPU on gloo): make train-ddp NPROC=2 EXP=mri3d_dipvae
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m vaelab.train experiment=$(EXP) $(ARGS)

mlflow-server: $(STAMP) ## MLflow tracking server for many workers on http://127.0.0.1:5050 (SERVER_PORT=...), PostgreSQL store SERVER_STORE=..., artifacts under $(OUT)/mlartifacts
	$(BIN)/python -m vaelab.server --backend-store-uri '$(SERVER_STORE)' --artifacts-destination $(OUT)/mlartifacts --port $(SERVER_PORT)

# One uvicorn worker and no job runner (MLflow 3's GenAI jobs: a runner, 7 huey consumers):
# 3 processes and 0.5 GiB answering in ~10 s on 2 busy cores, not 16 and 2.6 GiB in 35-60 s.
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true or UI_WORKERS=N (here or in the environment) asks for them.
ui: export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 (PORT=...) over the project store multirun/mlflow.db
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(OUT)/mlflow.db --host 127.0.0.1 --port $(PORT) --workers $(or $(UI_WORKERS),1)

# vaelab.dashboard: optuna-dashboard that reads Optuna 5's named constraints (feasibility).
dashboard: $(STAMP) ## Optuna dashboard on http://127.0.0.1:8080 for a study: make dashboard STUDY=collapse
	$(BIN)/python -m vaelab.dashboard $(OUT)/optuna/$(STUDY).journal --host 127.0.0.1 --port $(DASHBOARD_PORT)

# Two pytest processes (one per core here), each taking whole test files, so a file's
# fixtures (a tiny sweep, a tracking server) start once. The 15 slowest tests are listed last.
test: $(STAMP) lint ## Install, then the lint checks and the whole test suite
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

test-fast: $(STAMP) ## Run only the tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP) ## Print throughput of every model per precision, share of matmul peak, streaming memory and speed, loop and sweep overhead (~10 min)
	$(BIN)/python -m vaelab.bench
	$(BIN)/python -m vaelab.bench_data
	$(BIN)/python -m vaelab.bench_sweep

evidence: $(STAMP) ## The generic collapse search on every bundled data set; writes README's results table (~15 min)
	$(BIN)/python -m vaelab.evidence --trials $(TRIALS) --epochs $(EPOCHS)

lint: $(STAMP) ## ruff check, ruff format --check, and the import-linter layers contract (pyproject.toml)
	$(BIN)/ruff check vaelab tests
	$(BIN)/ruff format --check vaelab tests
	$(BIN)/lint-imports

clean-multirun: ## Delete everything runs wrote under OUT (multirun/; asks first)
	@printf 'Delete every run, the MLflow store and Optuna storage under $(OUT)/? [y/N] '; \
	read answer; if [ "$$answer" = y ]; then find '$(OUT)' -mindepth 1 ! -name README.md -exec rm -rf {} +; echo deleted; else echo kept; fi

# train-<name> and sweep-<name> for every entry of EXPERIMENTS (listed by `make help`).
$(foreach name,$(EXPERIMENTS),$(eval $(call experiment_targets,$(name))))
