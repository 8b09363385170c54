#!/usr/bin/env bash
# The routing ablation at the CPU main job's size (training/configs/tiny_cpu.yaml: width 128, 4 layers, 4
# experts top-2 in every other layer, 1,070 steps, about 4 min a run on 2 cores): dense and every routing,
# seeds 0 and 1, one run after another (benchmarks/sweep_cpu.sh), runs named <routing>_s<seed>; then
# benchmarks.sweep_summary's table. The GPU ablation at Ti is benchmarks/routing_ablation.sh; both feed
# benchmarks.ablation_report.
#   bash benchmarks/routing_ablation_cpu.sh [outdir] [summary.json]
specs=()
for routing in none attribute token context modality task; do
  specs+=("$routing|--set model.moe_routing=$routing")
done
OUT_DIR=${1:-outputs/routing-ablation-cpu} SUMMARY=${2:-} COMMAND="bash benchmarks/routing_ablation_cpu.sh $*" \
  bash benchmarks/sweep_cpu.sh "${specs[@]}"
