# The two commands of the README: `make quickstart` (a small search on the built-in corpus)
# and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where no torch is installed, take the CPU build first so pip does not pull a multi-GB CUDA
# build on a CPU-only machine. Set TORCH_SPEC="torch" (or a CUDA wheel) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
# Test processes (pytest-xdist): CI's two cores.
TEST_WORKERS ?= 2

# What this project needs beyond the GPU machine's image (whose python3 holds torch, lightning,
# numpy, scipy, pytest...), as wheels for its Python 3.12: the versions this venv holds.
GPU_WHEELS ?= optuna==5.0.0 optuna-dashboard==0.21.0 plotly==7.1.0 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 sqlalchemy==2.1.9 \
	alembic==1.20.1 mako==1.4.3 colorlog==6.12.0 bottle==0.13.4

.PHONY: quickstart test test-fast lint bench setup clean gpu-smoke gpu-wheels

# `.[test]` is every extra (`all`: report, dashboard, hf, loggers...) and the test tools, so
# the quickstart's report and every test run after this one install.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	$(BIN)/nas search studies/quickstart.yaml
	$(BIN)/nas report studies/quickstart.yaml --out runs/quickstart-report.html

test: setup
	$(BIN)/ruff check nas tests benchmarks
	bash scripts/ensure-system-deps.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# Your own loop: everything but the tests marked slow (training, servers, killed processes).
test-fast: setup
	$(BIN)/ruff check nas tests benchmarks
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow"

bench: setup
	$(BIN)/python benchmarks/throughput.py

# benchmarks/gpu_smoke.sh: the GPU path end to end in 10 minutes (GPU_SMOKE_DEVICE=cpu: tiny).
gpu-smoke:
	bash benchmarks/gpu_smoke.sh

# Wheels for a GPU machine that reaches no package index (see benchmarks/gpu_smoke.sh).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
