#!/usr/bin/env bash
# Downstream tuning of the CPU main job, dense against attribute MoE: part 12 of benchmarks/routing_ablation.sh
# at the main job's size (training/configs/tiny_cpu.yaml, seed 0, about 4 min a model on 2 cores). Each model,
# trained as configured, is tuned on 1% of a task it did not pre-train on (emoji group classification) and of
# one it did (Fashion-MNIST) by prompt tuning, a linear probe and full fine-tuning (prompt_tuning's defaults:
# the step chosen on another 1% of the training rows), one after another (benchmarks/sweep_cpu.sh); runs
# named tuned-<routing>_s0, which benchmarks.ablation_report's tuning table reads.
#   bash benchmarks/tuning_cpu.sh [outdir] [summary.json]
OUT_DIR=${1:-outputs/tuning-cpu} SUMMARY=${2:-} SEEDS=0 COMMAND="bash benchmarks/tuning_cpu.sh $*" \
TUNE_RUNS=${TUNE_RUNS:-emoji_group_classification:prompt,emoji_group_classification:linear_probe,\
emoji_group_classification:full,fashion_mnist_classification:prompt,fashion_mnist_classification:linear_probe,\
fashion_mnist_classification:full} \
  bash benchmarks/sweep_cpu.sh "tuned-none|--set model.moe_routing=none" "tuned-attribute|"
