# Every target works on a fresh clone with only python3: the venv is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SRC := ckpt_callbacks tests benchmarks examples conftest.py

.PHONY: install test lint typecheck pytest demo bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff format --check $(SRC)
	$(BIN)/ruff check $(SRC)
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy ckpt_callbacks examples tests/programs

pytest: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

demo: install
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

bench: install
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) checkpoints build *.egg-info
