#!/usr/bin/env bash
# The learning rate of the attribute gates in the CPU main job (training/configs/tiny_cpu.yaml, about 4 min a
# run on 2 cores): attribute MoE as configured (the gates at the model's learning rate) and with
# optim.router_lr_scale 0 (the gates kept as initialised), 0.1 and 10, seeds 0 and 1 (benchmarks/sweep_cpu.sh),
# runs named <variant>_s<seed>; then each model's interference and expert use on five tasks
# (training.interference, 32 samples), and benchmarks.sweep_summary's table. benchmarks.ablation_report prints the experts each gate uses.
#   bash benchmarks/router_lr_cpu.sh [outdir] [summary.json]
OUT_DIR=${1:-outputs/router-lr-cpu} SUMMARY=${2:-} COMMAND="bash benchmarks/router_lr_cpu.sh $*" \
INTERFERENCE_TASKS=fashion_mnist_classification,austen_mlm,emoji_captioning,emoji_retrieval,wordnet_lexname_classification \
INTERFERENCE_ARGS="--vocabulary_size 512" \
  bash benchmarks/sweep_cpu.sh "attribute|" "router_lr0|--set optim.router_lr_scale=0" \
    "router_lr0.1|--set optim.router_lr_scale=0.1" "router_lr10|--set optim.router_lr_scale=10"
