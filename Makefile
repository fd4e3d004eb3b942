# make run   set up .venv, then `dvc repro` on params.yaml (default: the embedded sklearn-digits competition)
# make run PRESET=cpu-fast   merge configs/presets/cpu-fast.yaml into params.yaml first
# make test  set up .venv, then the test suite
# make test-fast   the tests that train no model (the edit-test loop)
# make test-isa   the training and tuning tests again, on a lower instruction set than this CPU's best
# make test-slow  the tests marked slow (two tuning workers on a real PostgreSQL server; kill -9 and SIGTERM resumes)
# make lint  ruff: lint (with import order) and the format check
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test test-fast test-isa test-slow lint clean

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

test-fast: setup
	python -m pytest -m 'not training and not slow'

# oneDNN, MKL and ATen each pick kernels for the CPU they run on, so float results differ in the last
# bits between machines and so do training trajectories. test-isa runs the tests marked `training`
# on a lower instruction set than this CPU's best (AVX2 where it has AVX-512, else SSE4.1): a test
# that holds only for one machine's rounding then fails on every machine, not only on some.
ifeq ($(shell grep -qsw avx512f /proc/cpuinfo && echo yes),yes)
LOWER_ISA := ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
else
LOWER_ISA := ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default
endif

test-isa: setup
	$(LOWER_ISA) python -m pytest -m 'training and not slow and not not_isa'

test-slow: setup
	python -m pytest -m slow

lint: setup
	ruff check .
	ruff format --check .

clean:
	rm -rf data/prepared models/*/ predictions reports bundle submissions/*.csv submissions/ensemble.json submissions/methods mlflow.db mlruns mlartifacts
