#!/usr/bin/env bash
# Every GPU test and benchmark in one command, on a machine with one CUDA GPU and no network, in under 9 minutes.
# Each part has its own time limit, so a hang costs that part alone; a failing part does not stop the others.
#
#   bash scripts/gpu_kit.sh                        # first, on a machine with package access: fills .gpu_kit/
#   bash scripts/gpu_check.sh RESULTS_DIR          # then, on the GPU machine, with .gpu_kit/ beside the tree
#   bash scripts/gpu_check.sh --dry-run [RESULTS]  # here, without a GPU: the same parts in a Python 3.12 venv of the
#                                                  # GPU image's versions (scripts/gpu_image_venv.sh builds it)
#
# RESULTS_DIR receives gpu_check.log (every part's output, in order), gpu_check_summary.jsonl (per part: exit code,
# seconds, limit) and the benchmarks' tables. Exit status: 0 if every part passed, 1 otherwise, 2 when it cannot
# start (no GPU, no kit). Uses python3 (or $PYTHON), which must hold a CUDA build of torch; packages it lacks come
# from .gpu_kit/wheels. The dry run proves that every import resolves and runs what a CPU can: the extension build
# (CUDA included, with nvcc), the kernel and op tests (Triton's interpreter), a small smoke run, the benchmarks'
# imports; the GPU-only tests report themselves skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
RESULTS=$(mkdir -p "${1:-benchmarks/results/gpu}" && cd "${1:-benchmarks/results/gpu}" && pwd)
KIT=$PWD/.gpu_kit
SITE=/tmp/guide_mega_site
LOG=$RESULTS/gpu_check.log
SUMMARY=$RESULTS/gpu_check_summary.jsonl
if [ "$DRY_RUN" -eq 1 ]; then
  PY=${PYTHON:-$PWD/.cache/gpu-image-venv/bin/python}
  DEVICE=cpu
  BUDGET=${GPU_CHECK_BUDGET_S:-2400}
else
  PY=${PYTHON:-python3}
  DEVICE=cuda
  BUDGET=${GPU_CHECK_BUDGET_S:-510}
fi
: >"$LOG"
: >"$SUMMARY"

if [ "$DRY_RUN" -eq 1 ] && [ ! -x "$PY" ]; then
  echo "gpu_check: $PY is missing: build the GPU image's venv with scripts/gpu_image_venv.sh" >&2
  exit 2
fi
if [ "$DRY_RUN" -eq 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY (without a GPU: --dry-run)" >&2
  exit 2
fi
if [ ! -d "$KIT/wheels" ]; then
  echo "gpu_check: $KIT/wheels is missing: run scripts/gpu_kit.sh where pip works and carry .gpu_kit" >&2
  exit 2
fi

# part NAME LIMIT_S COMMAND...: run COMMAND under a time limit (cut to what is left of the whole check's budget),
# append its output to the log, record the result. A part with under 10 s left is skipped and counted as failed.
DEADLINE=$((SECONDS + BUDGET))
failures=()
part() {
  local name=$1 limit=$2
  shift 2
  [ "$DRY_RUN" -eq 0 ] || limit=$((limit * 4))
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, the check's time budget is spent" | tee -a "$LOG"
    printf '{"part": "%s", "exit": null, "skipped": true}\n' "$name" >>"$SUMMARY"
    failures+=("$name")
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
  local rc=$?
  local seconds=$((SECONDS - start))
  echo "=== $name: exit $rc after ${seconds}s" | tee -a "$LOG"
  printf '{"part": "%s", "exit": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" "$seconds" "$limit" >>"$SUMMARY"
  [ "$rc" -eq 0 ] || failures+=("$name")
}

environment() {
  [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" - <<'EOF'
import platform, torch, transformers, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"triton {triton.__version__}, transformers {transformers.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
          f"sm_{props.major}{props.minor}")
EOF
  nvcc --version | tail -1
}

install_kit() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/wheels/*.whl
}

# guide_mega runs from the tree: kernels/ is the package guide_mega.kernels (setup.py maps it the same way).
link_kernels() {
  [ -e guide_mega/kernels ] || ln -s ../kernels guide_mega/kernels
  "$PY" -c "import guide_mega.kernels, guide_mega.build, megatron.core, math_verify, liger_kernel; print('imports resolve')"
}

# The GPU image's default CXX (/opt/gcc/bin/g++) links libstdc++ statically, and the op's first error then kills
# the process (seen 2026-11-27; setup.py now probes for this and drops such a build). /usr/bin/g++ works.
build_extension() {
  local cxx=${CXX:-}
  [ -x /usr/bin/g++ ] && cxx=/usr/bin/g++
  if [ "$DEVICE" = cpu ]; then
    # No CUDA toolkit libraries here beside nvcc: link against the CUDA runtime that torch's wheels brought.
    local cudart
    cudart=$("$PY" -c "import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in pathlib.Path(d).glob('*/lib/libcudart.so.*')))")
    mkdir -p /tmp/guide_mega_cudart && ln -sf "$cudart" /tmp/guide_mega_cudart/libcudart.so
    export LIBRARY_PATH=/tmp/guide_mega_cudart${LIBRARY_PATH:+:$LIBRARY_PATH}
  fi
  rm -f guide_mega/_C.cpython-312*.so
  CXX=$cxx MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py -q build_ext --inplace
  "$PY" -c "import torch, guide_mega._C; print('guide_mega._C ops:', torch.ops.guide_mega)"
}

smoke_run() {
  local work=/tmp/guide_mega_smoke
  local small=()
  # On a CPU: the same wiring on a few tokens, in fp32.
  [ "$DEVICE" = cuda ] || small=(model.dtype=float32 train.steps=1 train.prompts_per_step=2 rollout.group_size=4
    rollout.max_new_tokens=8)
  rm -rf "$work" && mkdir -p "$work"
  "$PY" scripts/gpu_smoke_model.py "$KIT/smollm2-135m" "$work" || return 1
  "$PY" -m guide_mega.cli train --config configs/gpu_smoke.yaml model.path="$work/model" \
    data.source="$work/say_one.jsonl" logging.run_dir="$work/run" "${small[@]}" || return 1
  cat "$work/run/metrics.jsonl"
}

bench() {
  if [ "$DEVICE" = cpu ]; then
    "$PY" "benchmarks/bench_$1.py" --help >/dev/null && echo "bench_$1 imports resolve"
    return
  fi
  "$PY" "benchmarks/bench_$1.py" --device cuda || return 1
  cp benchmarks/results/"$1"_cuda_*.md "$RESULTS/"
}

# The parts run in child shells (under timeout), which see exported functions and variables only.
export -f environment install_kit link_kernels build_extension smoke_run bench
export PY KIT SITE RESULTS DEVICE
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
workers=8
[ "$DEVICE" = cuda ] || workers=2
part environment 60 environment
part install_kit 90 install_kit
part link_kernels 60 link_kernels
# The extension compiles on the CPUs while the kernel tests (compiled Triton on CUDA tensors) run.
timeout 600 bash -c build_extension >"$RESULTS/build.log" 2>&1 &
build_pid=$!
part kernel_tests 150 "$PY" -m pytest -q -rs -n "$workers" -p no:cacheprovider tests/kernels
wait "$build_pid"
build_rc=$?
cat "$RESULTS/build.log" >>"$LOG" && rm "$RESULTS/build.log"
printf '{"part": "build_extension", "exit": %d}\n' "$build_rc" >>"$SUMMARY"
[ "$build_rc" -eq 0 ] || failures+=(build_extension)
part csrc_tests 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/csrc
# In order of what a short lease most needs: the fused logprob numbers, the Megatron backend, a training run.
part bench_token_logprobs 120 bench token_logprobs
part gpu_tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/training
part smoke_run 120 smoke_run
for name in policy_loss train_step group_advantages; do
  part "bench_$name" 60 bench "$name"
done

if [ "${#failures[@]}" -gt 0 ]; then
  echo "gpu_check: failed: ${failures[*]}" | tee -a "$LOG" >&2
  exit 1
fi
echo "gpu_check: every part passed" | tee -a "$LOG"
