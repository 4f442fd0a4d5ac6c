# Every target with a `##` comment is listed by `make help` (the default goal).
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done

# Command-line variables (make run-all RUN=exp1 EPOCHS=5 ...) are handed to the runner
# as they were typed; it knows which are its own and which are notebook parameters.
# Each NAME=VALUE is single-quoted for bash and taken with $(value ...), so spaces, quotes,
# parentheses, ';' and '$' arrive intact and nothing in a value is executed or expanded.
# $(call args,EXCEPT,PREFIX): the command-line variables but the Makefile's own and EXCEPT.
OWN_VARS := PYTHON PY VENV STAMP NPROC QUICK LAB_DIR PORT
quote = '$(subst ','\'',$(1))'
cli_vars = $(sort $(filter-out $(OWN_VARS) $(1),$(foreach v,$(.VARIABLES),$(if \
	$(filter command line,$(origin $(v))),$(v)))))
args = $(foreach v,$(call cli_vars,$(1)),$(call quote,$(2)$(v)=$(value $(v))))
# Make would also export them to every recipe's environment, expanding each value (and
# running any $(shell ...) in it) to do so: they reach the runner as arguments only.
unexport $(call cli_vars)
# A line break in a value would end the recipe's command line and run the rest as a
# command (under make -i): refused before any recipe runs. The runner refuses the other
# control characters.
define newline


endef
$(foreach v,$(call cli_vars),$(if $(findstring $(newline),$(value $(v))),$(error $(v)= holds \
	a line break: give the value on one line)))

.PHONY: help setup lab browser-deps test unit lint check-notebooks faces faces-merge split run-all benchmark demo train-ddp bench export tensorboard app clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv, install the pinned packages and dfutils, register the kernel and nbstripout
	@$(PY) -m dfutils install-kernel >/dev/null
	@# The filter strips outputs on `git add`, and the kernel details JupyterLab saves.
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(VENV)/bin/nbstripout --install && \
		git config filter.nbstripout.extrakeys metadata.language_info; fi
	@echo "setup done: $(VENV) ready, kernel 'Python (dfutils)' registered, nbstripout filter installed"

LAB_DIR ?= notebooks
lab: $(STAMP) ## Open JupyterLab on notebooks/ (LAB_DIR=...), on this machine only, with a token
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(call quote,$(value LAB_DIR)) --ServerApp.ip=127.0.0.1 \
		--ContentsManager.post_save_hook=dfutils.jupyter.refresh_git_stat \
		$(if $(filter 0,$(shell id -u)),--allow-root)

# Debian's chromium and its chromedriver, for the browser tests (no driver can be downloaded).
browser-deps: ## Install chromium and chromium-driver with apt-get when missing (as root; CI does)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium and chromedriver are installed"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

test: lint check-notebooks ## Lint, check notebooks, then run unit tests and notebook smoke tests
	$(PY) -m pytest

unit: $(STAMP) ## Unit tests only (skips the slower notebook, torchrun and browser tests)
	$(PY) -m pytest -m "not notebooks and not distributed and not browser"

lint: $(STAMP) ## Ruff over the package, tests and notebooks
	$(VENV)/bin/ruff check dfutils tests notebooks

check-notebooks: $(STAMP) ## What a commit of the notebooks would carry has no outputs; each has one `parameters` cell, its first code cell
	$(PY) -m dfutils check-notebooks notebooks/*.ipynb

faces: $(STAMP) ## Run 00-faces headlessly into FACES_DIR, its notebook in FACES_DIR/faces-run (RAW_DIR= FACES_DIR= DATASET= ...; SHARD=i/n or auto: one task of a cluster job)
	$(if $(value SHARD),$(PY) -m dfutils faces $(call args,RUN STEPS),$(PY) -m dfutils run-all \
		--replace-run --beside-data STEPS=00-faces $(call args,RUN STEPS))

faces-merge: $(STAMP) ## Build FACES_DIR from the shards of `make faces SHARD=i/n` (the same variables, SHARD aside)
	$(PY) -m dfutils merge faces $(call args,RUN STEPS SHARD)

split: $(STAMP) ## Run 01-split headlessly into DATA_DIR, its notebook in DATA_DIR/split-run (RAW_DIR= DATA_DIR= ...)
	$(PY) -m dfutils run-all --replace-run --beside-data STEPS=01-split $(call args,RUN STEPS)

run-all: $(STAMP) ## Run the notebook chain into runs/<RUN>: 01-split, 02-train, 03-gradcam (00-faces with FACES=1, 04-evaluate with EVAL_DIR=, 05-benchmark with TEST_SETS=; RUN= PARAMS= OVERWRITE=1 RESUME=1 key=value ...)
	$(PY) -m dfutils run-all $(call args)

benchmark: $(STAMP) ## Run 05-benchmark: the trained run RUN= on the test splits of TEST_SETS=<split>,<split>: the cross-dataset table
	$(PY) -m dfutils run-all --replace-run STEPS=05-benchmark $(call args,STEPS)

demo: $(STAMP) ## Build the demo data set and run the whole chain on it into runs/demo
	$(PY) -m dfutils demo
	$(PY) -m dfutils run-all --replace-run RUN=demo PARAMS=notebooks/params/demo.yaml $(call args)

export: $(STAMP) ## Export the run RUN= as a folder to share: OUT=<folder> (new or empty) gets model.safetensors, config.json, README.md (a model card); ONNX=1 adds model.onnx
	$(if $(value RUN),,$(error RUN=<name> names the run in runs/ to export))
	$(PY) -m dfutils export --run runs/$(call quote,$(value RUN)) $(call args,RUN)

tensorboard: $(STAMP) ## Serve the training curves of the run RUN= with TensorBoard on this machine only (PORT=6006)
	$(if $(value RUN),,$(error RUN=<name> names the run in runs/ whose curves to show))
	$(VENV)/bin/tensorboard --logdir runs/$(call quote,$(value RUN))/tensorboard --host 127.0.0.1 \
		--port $(call quote,$(or $(value PORT),6006))

app: $(STAMP) ## A web page to try a detector, on this machine only: RUN=<run> or MODEL=<exported folder> (PORT=7860 SAVE_DIR=...)
	$(if $(value RUN)$(value MODEL),,$(error RUN=<name> (a run in runs/) or MODEL=<folder> (an exported detector) names the detector))
	$(PY) -m dfutils app $(if $(value RUN),--run runs/$(call quote,$(value RUN))) \
		--port $(call quote,$(or $(value PORT),7860)) $(call args,RUN PORT)

NPROC ?= 2
train-ddp: $(STAMP) ## Train (02-train's step) with torchrun on NPROC CPU processes (PARAMS= KEY=value ...)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(call quote,$(value NPROC)) -m dfutils train \
		$(call args)

bench: $(STAMP) ## Benchmarks as ratios to a bare forward pass; writes runs/bench/results.json (QUICK=1: shorter)
	$(PY) tests/benchmarks/bench.py $(if $(value QUICK),--quick)

clean: ## Delete generated outputs (split, demo data, runs); never touches dataset_raw/
	rm -rf data/train data/val data/test data/masks data/manifest.csv data/split_report.json
	rm -rf data/split-run data/demo data/demo_raw data/.split-* runs
