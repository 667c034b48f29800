# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: demo test test-fast bench install

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,triton,onnx,quant,trl,diffusers]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/adapt-compiler demo

# two workers with one thread each (compiles are single-threaded; the tests' math is tiny); whole files per
# worker, so module-scoped fixtures that compile are built once; each worker its own Inductor cache (conftest.py);
# heaviest files first (tests/durations.py), not xdist's default of most tests first
test: $(STAMP)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# the inner loop: everything but the tests that compile a real model with Inductor (marked slow)
test-fast: $(STAMP)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "not slow" -x tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
