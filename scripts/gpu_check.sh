#!/usr/bin/env bash
# Every GPU test and benchmark in one go, on a machine with a CUDA GPU. Results land in benchmarks/results/:
# the pytest log and each benchmark's own dated table. Exits non-zero if any test or benchmark failed, after
# running all of them (one failing benchmark should not hide the others' numbers).
#
#   bash scripts/gpu_check.sh            # uses python3 (or $PYTHON), which must hold a CUDA build of torch
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
STAMP=$(date -u +%Y%m%d)
mkdir -p "$RESULTS"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Build the C++/CUDA extension in place (nvcc present); --no-deps because the machine may have no index access.
"$PY" -m pip install --quiet --no-build-isolation --no-deps -e . || echo "gpu_check: editable install failed" >&2

failures=()
"$PY" -m pytest -q -rs -m gpu tests 2>&1 | tee "$RESULTS/gpu_tests_${STAMP}.log"
rc=${PIPESTATUS[0]}
# Exit 5 means no GPU test was collected (none written yet for some paths): not a failure of this check.
[ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || failures+=("pytest -m gpu")
# The kernel tests run on CUDA tensors (compiled Triton, not the interpreter) wherever a GPU is visible.
"$PY" -m pytest -q -rs tests/kernels tests/csrc 2>&1 | tee "$RESULTS/gpu_kernel_tests_${STAMP}.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failures+=("pytest tests/kernels tests/csrc")

for bench in benchmarks/bench_*.py; do
  echo "== $bench --device cuda"
  if ! "$PY" "$bench" --device cuda; then
    failures+=("$bench")
  fi
done

if [ "${#failures[@]}" -gt 0 ]; then
  echo "gpu_check: failed: ${failures[*]}" >&2
  exit 1
fi
echo "gpu_check: all GPU tests and benchmarks passed"
