#!/usr/bin/env bash
# Every GPU test and benchmark in one command, on a machine with one CUDA GPU and no network, in under 9 minutes.
# Each part has its own time limit, so a hang costs that part alone; a failing part does not stop the others.
#
#   bash scripts/gpu_kit.sh                      # first, on a machine with package access: fills .gpu_kit/
#   bash scripts/gpu_check.sh RESULTS_DIR        # then, on the GPU machine, with .gpu_kit/ beside the tree
#
# RESULTS_DIR receives gpu_check.log (every part's output, in order), gpu_check_summary.json (per part: exit code,
# seconds, limit) and the benchmarks' tables. Exit status: 0 if every part passed, 1 otherwise, 2 without a GPU.
# Uses python3 (or $PYTHON), which must hold a CUDA build of torch; packages it lacks come from .gpu_kit/wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(mkdir -p "${1:-benchmarks/results/gpu}" && cd "${1:-benchmarks/results/gpu}" && pwd)
PY=${PYTHON:-python3}
KIT=$PWD/.gpu_kit
SITE=/tmp/guide_mega_site
LOG=$RESULTS/gpu_check.log
SUMMARY=$RESULTS/gpu_check_summary.jsonl
: >"$LOG"
: >"$SUMMARY"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY" >&2
  exit 2
fi
if [ ! -d "$KIT/wheels" ]; then
  echo "gpu_check: $KIT/wheels is missing: run scripts/gpu_kit.sh where pip works and carry .gpu_kit" >&2
  exit 2
fi

# part NAME LIMIT_S COMMAND...: run COMMAND under a time limit (cut to what is left of the whole check's budget),
# append its output to the log, record the result. A part with under 10 s left is skipped and counted as failed.
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-510}))
failures=()
part() {
  local name=$1 limit=$2
  shift 2
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
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" - <<'EOF'
import platform, torch, triton
props = torch.cuda.get_device_properties(0)
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}")
print(f"{props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
EOF
  nvcc --version | tail -1
}

install_kit() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/wheels/*.whl
}

# guide_mega runs from the tree: kernels/ is the package guide_mega.kernels (setup.py maps it the same way).
link_kernels() {
  [ -e guide_mega/kernels ] || ln -s ../kernels guide_mega/kernels
  "$PY" -c "import guide_mega.kernels, megatron.core, math_verify, liger_kernel; print('imports resolve')"
}

# The GPU image's default CXX (/opt/gcc/bin/g++) links libstdc++ statically, and the op's first error then kills
# the process (seen 2026-11-27; setup.py now probes for this and drops such a build). /usr/bin/g++ works.
build_extension() {
  local cxx=${CXX:-}
  [ -x /usr/bin/g++ ] && cxx=/usr/bin/g++
  CXX=$cxx MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py -q build_ext --inplace
  "$PY" -c "import torch, guide_mega._C; print('guide_mega._C ops:', torch.ops.guide_mega)"
}

smoke_run() {
  local work=/tmp/guide_mega_smoke
  rm -rf "$work" && mkdir -p "$work"
  "$PY" scripts/gpu_smoke_model.py "$KIT/smollm2-135m" "$work" || return 1
  "$PY" -m guide_mega.cli train --config configs/gpu_smoke.yaml model.path="$work/model" \
    data.source="$work/say_one.jsonl" logging.run_dir="$work/run" "$@" || return 1
  cat "$work/run/metrics.jsonl"
}

bench() {
  "$PY" "benchmarks/bench_$1.py" --device cuda || return 1
  cp benchmarks/results/"$1"_cuda_*.md "$RESULTS/"
}

# The parts run in child shells (under timeout), which see exported functions and variables only.
export -f environment install_kit link_kernels build_extension smoke_run bench
export PY KIT SITE RESULTS
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
part environment 60 environment
part install_kit 90 install_kit
part link_kernels 60 link_kernels
# The extension compiles on the CPUs while the kernel tests (compiled Triton on CUDA tensors) run.
timeout 300 bash -c build_extension >"$RESULTS/build.log" 2>&1 &
build_pid=$!
part kernel_tests 150 "$PY" -m pytest -q -rs -n 8 -p no:cacheprovider tests/kernels
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
