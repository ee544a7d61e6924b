#!/usr/bin/env bash
# GPU readiness check (issue 15), under 5 minutes on one GPU:
#   1. the demo pipeline on the GPU: 1 worker (nccl backend), bf16 autocast, torch.compile on;
#   2. the step benchmark on the GPU (samples/s per method and switch, peak GPU memory).
# Usage: bash scripts/gpu_check.sh [--dry-run]   (--dry-run prints the commands, runs nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN_DIR=${GPU_CHECK_RUN_DIR:-runs/gpu-check}
DEMO=(.venv/bin/localcl demo --run-dir "$RUN_DIR" --no-progress
  --set scaling.num_workers=1 --set scaling.use_gpu=true
  --set "scaling.resources_per_worker={CPU: 1, GPU: 1}"
  --set pretrain.schedule.amp=bf16 --set finetune.schedule.amp=bf16
  --set runtime.compile=true)
BENCH=("$PY" benchmarks/bench_step.py --device cuda --compile --size 192 --batch 16 --reps 3
  --rows finetune/supervised finetune/ideal pretrain/ideal/main
  --json "$RUN_DIR/bench_step.json")
MEM=("$PY" -c "import torch; print(torch.cuda.get_device_name(0), f'{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB')")
if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%q ' "${MEM[@]}"; echo
  printf '%q ' "${DEMO[@]}"; echo
  printf '%q ' "${BENCH[@]}"; echo
  exit 0
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
"${MEM[@]}"
start=$(date +%s)
"${DEMO[@]}"
echo "demo on GPU: $(( $(date +%s) - start )) s"
"${BENCH[@]}"   # prints samples/s per row and switch, and max_memory_allocated per row
echo "gpu_check total: $(( $(date +%s) - start )) s"
