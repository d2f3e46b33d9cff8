#!/usr/bin/env bash
# Checks for a CUDA machine, a few minutes in all:
#  - the official fixture on the GPU: float32 with TF32 off (rel <= 2e-3, argmax 100 %, greedy identical),
#    bfloat16 exact=True (mean |ours - official_bf16| <= 2 x mean |official_bf16 - official_f32|),
#    the bfloat16 fast path (reported);
#  - with two or more GPUs, the fixture split over them (torchrun, NCCL) against the float32 bound;
#  - a decode timing on the mid preset (native int8, 128-token prompt, --new-tokens 32).
# Prints a table, writes bench/results/gpu_check.json, exits non-zero when a bound is missed.
#
#   bench/gpu_check.sh [--device cuda:1] [--new-tokens 32] [--workdir DIR]
#   bench/gpu_check.sh --device cpu --ranks 2   # the same checks on the CPU (a dry run of the script)
#
# Needs a Python with a CUDA build of PyTorch and grok1's dependencies (e.g. `make setup
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`); PYTHON=... picks one.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  local candidate fallback=""
  for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    "$candidate" -c "import torch" 2>/dev/null || continue
    [ -n "$fallback" ] || fallback=$candidate
    if "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "${fallback:-python3}"
}

PY=$(pick_python)
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec timeout 570 "$PY" bench/gpu_check.py "$@"
