#!/usr/bin/env bash
# The routing ablation at the CPU main job's size (training/configs/tiny_cpu.yaml: width 128, 4 layers, 4
# experts top-2 in every other layer, 1,070 steps, about 4 min a run on 2 cores): dense and every routing,
# seeds 0 and 1, one run after another, runs named <routing>_s<seed>; then benchmarks.sweep_summary's table.
# The GPU ablation at Ti is benchmarks/routing_ablation.sh; both feed benchmarks.ablation_report.
#   bash benchmarks/routing_ablation_cpu.sh [outdir] [summary.json]
set -uo pipefail
OUT_DIR=${1:-outputs/routing-ablation-cpu}
mkdir -p "$OUT_DIR"
for seed in 0 1; do
  for routing in none attribute token context modality task; do
    name=${routing}_s$seed
    python -m training.pretrain --config training/configs/tiny_cpu.yaml --set output_dir="$OUT_DIR/$name" \
      --set seed=$seed --set train.resume=none --set model.moe_routing=$routing \
      > "$OUT_DIR/$name.log" 2>&1 || echo "$name failed: $OUT_DIR/$name.log"
  done
done
python -m benchmarks.sweep_summary "$OUT_DIR" --json "${2:-$OUT_DIR/summary.json}" \
  --command "bash benchmarks/routing_ablation_cpu.sh $*"
