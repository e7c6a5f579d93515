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

.PHONY: quickstart test lint bench setup clean

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

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
