#!/usr/bin/env bash
# Variants of the CPU main job one after another on this machine (the CPU counterpart of
# benchmarks/sweep_gpu.sh): each "variant|--set a=b ..." spec over SEEDS (default "0 1"), seeds outermost,
# runs named <variant>_s<seed> under OUT_DIR, each started over (train.resume=none) from CONFIG (default
# training/configs/tiny_cpu.yaml: about 4 min a run on 2 cores). INTERFERENCE_TASKS (comma-separated) also
# measures each finished model's interference and expert use with training.interference
# (INTERFERENCE_SAMPLES per task, default 32; INTERFERENCE_ARGS adds options). TUNE_RUNS (comma-separated
# task:method pairs, as in sweep_gpu.sh) then tunes each model on 1% of each task with
# prompt_tuning.run_prompt_tuning (TUNE_ARGS adds options), one after another. Then benchmarks.sweep_summary
# prints the table and writes SUMMARY (default OUT_DIR/summary.json) with COMMAND as the command it records.
# DRY_RUN=1 prints each run's name and settings instead.
#   OUT_DIR=outputs/sweep bash benchmarks/sweep_cpu.sh "attribute|" "dense|--set model.moe_routing=none"
set -uo pipefail
OUT_DIR=${OUT_DIR:?"OUT_DIR must name the folder the runs go to"}
CONFIG=${CONFIG:-training/configs/tiny_cpu.yaml}
read -r -a extra <<< "${INTERFERENCE_ARGS:-}"
read -r -a tune_extra <<< "${TUNE_ARGS:-}"
TUNE_RUNS=${TUNE_RUNS:-}
for seed in ${SEEDS:-0 1}; do
  for spec in "$@"; do
    name=${spec%%|*}_s$seed
    args=()
    [[ $spec != *"|"* ]] || read -r -a args <<< "${spec#*|}"
    if [ -n "${DRY_RUN:-}" ]; then
      echo "$name|${args[*]}"
      continue
    fi
    mkdir -p "$OUT_DIR"
    python -m training.pretrain --config "$CONFIG" --set output_dir="$OUT_DIR/$name" --set seed=$seed \
      --set train.resume=none "${args[@]}" > "$OUT_DIR/$name.log" 2>&1 || echo "$name failed: $OUT_DIR/$name.log"
    if [ -n "${INTERFERENCE_TASKS:-}" ]; then
      python -m training.interference --model "$OUT_DIR/$name/final" --tasks "$INTERFERENCE_TASKS" \
        --samples "${INTERFERENCE_SAMPLES:-32}" "${extra[@]}" --out "$OUT_DIR/$name/interference" \
        > "$OUT_DIR/$name.interference.log" 2>&1 || echo "$name interference failed: $OUT_DIR/$name.interference.log"
    fi
    for pair in ${TUNE_RUNS//,/ }; do
      task=${pair%%:*}; method=${pair#*:}
      python -m prompt_tuning.run_prompt_tuning --model "$OUT_DIR/$name/final" --task "$task" --data_fraction 0.01 \
        --method "$method" --output_dir "$OUT_DIR/$name/tune-$task-$method" "${tune_extra[@]}" \
        > "$OUT_DIR/$name.tune-$task-$method.log" 2>&1 \
        || echo "$name $pair failed: $OUT_DIR/$name.tune-$task-$method.log"
    done
  done
done
[ -z "${DRY_RUN:-}" ] || exit 0
python -m benchmarks.sweep_summary "$OUT_DIR" --json "${SUMMARY:-$OUT_DIR/summary.json}" \
  --command "${COMMAND:-bash benchmarks/sweep_cpu.sh $*}"
