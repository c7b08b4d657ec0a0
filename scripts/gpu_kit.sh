#!/usr/bin/env bash
# Prepare, on a machine with package-registry access, what scripts/gpu_check.sh needs on a GPU machine that has
# none: the Python 3.12 wheels its image lacks, and the shapes + tokenizer of the smoke-test model. Everything
# lands in .gpu_kit/ (git-ignored; carried to the GPU machine beside the working tree, under 60 MiB).
#
#   bash scripts/gpu_kit.sh            # uses .venv/bin/python (make install) for the tokenizer export
#
# The GPU image (Python 3.12, torch 2.11+cu130, Triton 3.6, transformers 5.17) has torch, numpy, sympy, pytest,
# pytest-xdist, pyyaml, tqdm, psutil, tensorboard and nvidia-ml-py; it lacks the packages below (setuptools: a
# known version for setup.py, whose pyproject needs >= 77).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu_kit
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
  "megatron-core==0.16.1"
  "math-verify==0.9.0"
  "latex2sympy2_extended==1.11.0"
  "antlr4-python3-runtime==4.13.2"
  "liger-kernel==0.8.5"
  "setuptools==80.9.0"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 any)

mkdir -p "$KIT/wheels"
platform_args=()
for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
for wheel in "${WHEELS[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$KIT/wheels" "$wheel"
done

# The smoke model: SmolLM2-135M's config and tokenizer (weights are drawn at random on the GPU machine).
"$PY" - "$KIT/smollm2-135m" <<'EOF'
import shutil
import sys
from pathlib import Path

from guide_mega.data.embedded_model import ensure_embedded_model

source = ensure_embedded_model("smollm2-135m-instruct")
target = Path(sys.argv[1])
target.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if path.suffix in (".json", ".jinja", ".txt") and path.name != "model.safetensors.index.json":
        shutil.copy2(path, target / path.name)
print(f"gpu_kit: {sorted(p.name for p in target.iterdir())} in {target}")
EOF

size_mib=$(du -sm "$KIT" | cut -f1)
echo "gpu_kit: $KIT holds ${size_mib} MiB"
if [ "$size_mib" -ge 60 ]; then
  echo "gpu_kit: $KIT is over the 60 MiB budget" >&2
  exit 1
fi
