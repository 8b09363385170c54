#!/usr/bin/env bash
# The gate noise of attribute routing in the CPU main job (training/configs/tiny_cpu.yaml, 2 cores, about 4 min
# a run): attribute MoE with the reference's noise (std 1 / experts on the gate logits in training), without
# it, and dense, seeds 0 and 1 (benchmarks/sweep_cpu.sh), runs named <variant>_s<seed>; then
# benchmarks.sweep_summary's table of every task's last held-out value (mean over the seeds, min-max), each MoE
# task's expert entropy among them.
#   bash benchmarks/router_noise_cpu.sh [outdir] [summary.json]
OUT_DIR=${1:-outputs/router-noise-cpu} SUMMARY=${2:-} COMMAND="bash benchmarks/router_noise_cpu.sh $*" \
  bash benchmarks/sweep_cpu.sh "attribute|" "attribute-no-noise|--set model.moe_router_noise_std=0" \
    "dense|--set model.moe_routing=none"
