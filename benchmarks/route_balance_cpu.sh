#!/usr/bin/env bash
# A balance loss for the attribute gates in the CPU main job (training/configs/tiny_cpu.yaml, about 4 min a run
# on 2 cores): attribute MoE as configured (no balance loss, the reference) and with
# model.moe_route_balance_coef 0.01 and 0.1, seeds 0 and 1 (benchmarks/sweep_cpu.sh), runs named
# <variant>_s<seed>; then each model's interference and expert use on five tasks (training.interference, 32
# samples), and benchmarks.sweep_summary's table. benchmarks.ablation_report prints the experts each gate uses.
#   bash benchmarks/route_balance_cpu.sh [outdir] [summary.json]
OUT_DIR=${1:-outputs/route-balance-cpu} SUMMARY=${2:-} COMMAND="bash benchmarks/route_balance_cpu.sh $*" \
INTERFERENCE_TASKS=fashion_mnist_classification,austen_mlm,emoji_captioning,emoji_retrieval,wordnet_lexname_classification \
INTERFERENCE_ARGS="--vocabulary_size 512" \
  bash benchmarks/sweep_cpu.sh "attribute|" "balance0.01|--set model.moe_route_balance_coef=0.01" \
    "balance0.1|--set model.moe_route_balance_coef=0.1"
