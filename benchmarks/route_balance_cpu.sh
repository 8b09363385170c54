#!/usr/bin/env bash
# A balance loss for the attribute gates in the CPU main job (training/configs/tiny_cpu.yaml, about 4 min a run
# on 2 cores): attribute MoE as configured (no balance loss, the reference) and with
# model.moe_route_balance_coef 0.01 and 0.1, seeds 0 and 1, runs named <variant>_s<seed>; then each model's
# interference and expert use on five tasks (training.interference, 32 samples), and
# benchmarks.sweep_summary's table. benchmarks.ablation_report prints the experts each gate uses.
#   bash benchmarks/route_balance_cpu.sh [outdir] [summary.json]
set -uo pipefail
OUT_DIR=${1:-outputs/route-balance-cpu}
mkdir -p "$OUT_DIR"
TASKS=fashion_mnist_classification,austen_mlm,emoji_captioning,emoji_retrieval,wordnet_lexname_classification
for seed in 0 1; do
  for spec in "attribute|" "balance0.01|--set model.moe_route_balance_coef=0.01" \
      "balance0.1|--set model.moe_route_balance_coef=0.1"; do
    name=${spec%%|*}_s$seed
    python -m training.pretrain --config training/configs/tiny_cpu.yaml --set output_dir="$OUT_DIR/$name" \
      --set seed=$seed --set train.resume=none ${spec#*|} > "$OUT_DIR/$name.log" 2>&1 || echo "$name failed: $OUT_DIR/$name.log"
    python -m training.interference --model "$OUT_DIR/$name/final" --tasks $TASKS --samples 32 \
      --vocabulary_size 512 --out "$OUT_DIR/$name/interference" > "$OUT_DIR/$name.interference.log" 2>&1 \
      || echo "$name interference failed: $OUT_DIR/$name.interference.log"
  done
done
python -m benchmarks.sweep_summary "$OUT_DIR" --json "${2:-$OUT_DIR/summary.json}" \
  --command "bash benchmarks/route_balance_cpu.sh $*"
