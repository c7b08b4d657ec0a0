#!/usr/bin/env bash
# Single-node training: one process per GPU (or NPROC processes on a CPU), SPMD under torchrun.
#
#   scripts/train.sh configs/qwen2.5-math-7b_guide_grpo.yaml [dotted.overrides=value ...]
#   NPROC=2 scripts/train.sh configs/demo_cpu.yaml parallel.tensor=2     # two CPU ranks, tensor parallel
#
# The world size must be a multiple of parallel.tensor * parallel.pipeline * parallel.context; the rest is
# data parallel. Rank 0 runs the rollout engine; SIGTERM (e.g. from Slurm) checkpoints and stops cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [dotted.override=value ...]" >&2
  exit 2
fi
config=$1
shift
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
# One OpenMP thread per rank on shared CPUs unless the caller says otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
# A user's mistake (config, data, model path, reward) is one line and exit 2 here, before torchrun starts the ranks
# (each would print it, and torchrun its own failure report after it).
"$PY" -m guide_mega.cli train --dry-run --config "$config" "$@" >/dev/null
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m guide_mega.cli train --config "$config" "$@"
