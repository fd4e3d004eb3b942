# make run   set up .venv, then `dvc repro` on params.yaml (default: the embedded sklearn-digits competition)
# make run PRESET=cpu-fast   merge configs/presets/cpu-fast.yaml into params.yaml first
# make test  set up .venv, then the test suite
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test clean

setup: $(VENV)/.installed

# Reinstalls when pyproject.toml changes. On Linux, pip resolves torch to the CUDA build,
# which also runs on a CPU.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

PRESET ?=

run: setup
ifneq ($(PRESET),)
	python -m pipeline preset $(PRESET)
endif
	dvc repro

test: setup
	python -m pytest

clean:
	rm -rf data/prepared models/*/ predictions reports submissions/*.csv submissions/methods mlflow.db mlruns mlartifacts
