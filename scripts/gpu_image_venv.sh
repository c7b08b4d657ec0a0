#!/usr/bin/env bash
# A Python 3.12 virtual environment with the GPU image's versions of what guide_mega imports (torch 2.11 — only its
# CUDA build exists for Python 3.12, a few GB once; it runs on the CPU —, Triton 3.6, transformers 5.17), for
# `scripts/gpu_check.sh --dry-run`: it proves on a machine without a GPU that the GPU check's imports resolve and
# its CPU-runnable parts pass with those versions. Built once into .cache/gpu-image-venv (git-ignored).
#
#   bash scripts/gpu_image_venv.sh        # PYTHON312=/path/to/python3.12 if python3.12 is not on PATH
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/gpu-image-venv
PY312=${PYTHON312:-$(command -v python3.12 || true)}
if [ -z "$PY312" ]; then
  echo "gpu_image_venv: no python3.12 found; set PYTHON312" >&2
  exit 2
fi
# The image's versions (KINDS.md of the device tool, read 2026-11); pytest, pytest-xdist, pyyaml, tqdm, psutil,
# tensorboard, nvidia-ml-py and sympy are there too, at versions not recorded: the newest are taken.
PACKAGES=(
  "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "numpy==2.5.2" "safetensors==0.8.0" "tokenizers==0.23.2"
  "huggingface_hub==1.33.0" pytest pytest-xdist pyyaml tqdm psutil tensorboard nvidia-ml-py sympy matplotlib
  setuptools wheel
)
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "${PACKAGES[@]}"
"$VENV/bin/python" -c "import torch, triton, transformers; print('gpu_image_venv:', torch.__version__, triton.__version__, transformers.__version__)"
