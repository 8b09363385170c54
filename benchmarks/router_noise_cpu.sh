#!/usr/bin/env bash
# The gate noise of attribute routing in the CPU main job (training/configs/tiny_cpu.yaml, 2 cores, about 4 min
# a run): attribute MoE with the reference's noise (std 1 / experts on the gate logits in training), without
# it, and dense, seeds 0 and 1, runs named <variant>_s<seed>; then benchmarks.sweep_summary's table of every
# task's last held-out value (mean over the seeds, min-max), each MoE task's expert entropy among them.
#   bash benchmarks/router_noise_cpu.sh [outdir] [summary.json]
set -uo pipefail
OUT_DIR=${1:-outputs/router-noise-cpu}
mkdir -p "$OUT_DIR"
for seed in 0 1; do
  for spec in "attribute|" "attribute-no-noise|--set model.moe_router_noise_std=0" "dense|--set model.moe_routing=none"; do
    name=${spec%%|*}_s$seed
    python -m training.pretrain --config training/configs/tiny_cpu.yaml --set output_dir="$OUT_DIR/$name" \
      --set seed=$seed --set train.resume=none ${spec#*|} > "$OUT_DIR/$name.log" 2>&1 || echo "$name failed: $OUT_DIR/$name.log"
  done
done
python -m benchmarks.sweep_summary "$OUT_DIR" --json "${2:-$OUT_DIR/summary.json}" \
  --command "bash benchmarks/router_noise_cpu.sh $*"
