#!/usr/bin/env bash
# The routing ablation of docs/training.md ("Task interference") on one GPU machine, in parts that each fit
# one device call: three Ti runs of gpu_b.yaml's nine tasks side by side (benchmarks/sweep_gpu.sh), the same
# data, steps, batches and learning rate for every run; each finished model's interference matrix measured on
# the device; the final evaluation with beam-search captions (BLEU-4, CIDEr-D).
#   PART=1 bash benchmarks/routing_ablation.sh     # carry .whl (benchmarks/gpu_wheels.sh) and data_cache/small
# Parts 1-6: routing none (dense), attribute, token, context, modality, task, seeds 0-2 each (runs named
# <routing>_s<seed>). Parts 7-9: the single-task references, attribute routing, seed 0: each trains one task
# for all the steps (every other task at sampling weight 0, still evaluated), three tasks per part (runs
# named single-<task>_s0). Parts 10-11: zero-shot, dense (10) and attribute (11) over seeds 0-2 with one task
# left out of pre-training (ZERO_SHOT_TASK, default openclipart_captioning: its images are seen through
# openclipart retrieval and captioning through emoji captioning), at weight 0 and still evaluated (runs named
# zeroshot-<routing>_s<seed>). Part 12: dense and attribute, seed 0 (runs named tuned-<routing>_s0), each
# then tuned on 1% of an unseen task (emoji group) and of a pre-trained one (Fashion-MNIST) by prompt tuning,
# a linear probe and full fine-tuning (TUNE_RUNS, as in sweep_gpu.sh; the same part given again with other
# TUNE_RUNS makes only the tunings not yet made), with no interference matrix (parts 1-2 measure it).
# Part 13: attribute with a balance loss over its route keys (model.moe_route_balance_coef,
# BALANCE_COEF, default 0.01) over seeds 0-2, runs named attribute-balance_s<seed>, with their interference
# matrices and expert use, beside part 2's attribute runs. Part 1 then also times every routing's training
# and inference step at Ti side by side in one process (benchmarks.bench_moe, eager like the runs, three
# interleaved repeats: the paper's cost columns) and writes $OUT/bench_moe_ti.json; PART=cost does only that.
# PART may join several parts by commas (PART=5,6: six runs side by side in one call; part 12 runs alone).
# A run that reaches train.max_minutes (6) stops with a checkpoint; the same command, given again while the
# machine is warm, resumes it (benchmarks/sweep_gpu.sh). STEPS (default 2000) sets the schedule; DRY_RUN=1
# prints the run specs (and part 12's tuning) instead; PYTHON names the interpreter that reads the config
# (default python3).
# Then: python -m benchmarks.sweep_summary <the unpacked sweep.tar.gz of every part> --json <log>.
set -euo pipefail
CONFIG=training/configs/gpu_b.yaml
ROUTINGS=(none attribute token context modality task)
TASKS=($(${PYTHON:-python3} -c "import yaml; print(' '.join(yaml.safe_load(open('$CONFIG'))['tasks']))"))
COMMON="--set model.model_size=ti --set optim.lr=2.0e-4 --set train.max_steps=${STEPS:-2000} \
--set train.eval_every=1000 --set train.save_every=0 --set train.eval_caption_beam=2 --set train.max_minutes=6"
add_part() {  # appends part $1's run specs to specs (and part 12's tuning to tune)
  local part=$1 routing seed task others other
  if [[ $part =~ ^[1-6]$ ]]; then
    [ "$part" != 1 ] || cost=1  # part 1 also times the routings
    routing=${ROUTINGS[$((part - 1))]}
    for seed in 0 1 2; do
      specs+=("${routing}_s$seed|$COMMON --set model.moe_routing=$routing --set seed=$seed")
    done
  elif [[ $part =~ ^[7-9]$ ]]; then
    for task in "${TASKS[@]:$(( (part - 7) * 3 )):3}"; do
      others=""
      for other in "${TASKS[@]}"; do
        [ "$other" = "$task" ] || others+=" --set tasks.$other.weight=0"
      done
      specs+=("single-${task}_s0|$COMMON --set model.moe_routing=attribute --set seed=0$others")
    done
  elif [[ $part =~ ^1[01]$ ]]; then
    routing=$([ "$part" = 10 ] && echo none || echo attribute)
    for seed in 0 1 2; do
      specs+=("zeroshot-${routing}_s$seed|$COMMON --set model.moe_routing=$routing --set seed=$seed \
--set tasks.${ZERO_SHOT_TASK:-openclipart_captioning}.weight=0")
    done
  elif [ "$part" = 12 ]; then
    for routing in none attribute; do
      specs+=("tuned-${routing}_s0|$COMMON --set model.moe_routing=$routing --set seed=0")
    done
    tune=${TUNE_RUNS:-emoji_group_classification:prompt,emoji_group_classification:linear_probe,\
emoji_group_classification:full,fashion_mnist_classification:prompt,fashion_mnist_classification:linear_probe,\
fashion_mnist_classification:full}
  elif [ "$part" = cost ]; then
    cost=1
  elif [ "$part" = 13 ]; then
    for seed in 0 1 2; do
      specs+=("attribute-balance_s$seed|$COMMON --set model.moe_routing=attribute --set seed=$seed \
--set model.moe_route_balance_coef=${BALANCE_COEF:-0.01}")
    done
  else
    echo "PART must be 1-13 or cost, or several joined by commas (1-6: a routing over seeds 0-2; 7-9:" \
      "single-task references; 10-11: zero-shot, dense and attribute; 12: dense and attribute tuned" \
      "downstream, alone; 13: attribute with a route balance loss; cost: the step times only), got '$PART'" >&2
    exit 2
  fi
}
PART=${PART:-}
specs=()
IFS=, read -r -a parts <<< "$PART"
[ ${#parts[@]} -gt 0 ] || add_part ""
for part in "${parts[@]}"; do
  add_part "$part"
done
if [ -n "${tune:-}" ] && [ ${#parts[@]} -gt 1 ]; then
  echo "PART 12 tunes every run of its call, so it runs alone, got '$PART'" >&2
  exit 2
fi
ALL_ROUTINGS=$(IFS=,; echo "${ROUTINGS[*]}")
if [ -n "${DRY_RUN:-}" ]; then
  [ ${#specs[@]} = 0 ] || printf '%s\n' "${specs[@]}"
  [ -z "${tune:-}" ] || echo "tune: $tune"
  [ -z "${cost:-}" ] || echo "cost: $ALL_ROUTINGS"
  exit 0
fi
interference=fashion_mnist_classification,austen_mlm,emoji_captioning,emoji_retrieval,wordnet_lexname_classification
if [ ${#specs[@]} -gt 0 ]; then
  CONFIG=$CONFIG RUN_LIMIT=${RUN_LIMIT:-450} INTERFERENCE_SAMPLES=${INTERFERENCE_SAMPLES:-64} \
  INTERFERENCE_LIMIT=${INTERFERENCE_LIMIT:-90} INTERFERENCE_ARGS="--vocabulary_size 4096" \
  INTERFERENCE_TASKS=$([ -n "${tune:-}" ] || echo $interference) \
  TUNE_RUNS=${tune:-} TUNE_LIMIT=${TUNE_LIMIT:-200} TUNE_ARGS="--vocabulary_size 4096" \
    bash benchmarks/sweep_gpu.sh "${specs[@]}"
fi
if [ -n "${cost:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:$PWD timeout ${COST_LIMIT:-150} python3 -m benchmarks.bench_moe --sizes ti --image-size 112 \
    --routings $ALL_ROUTINGS --infer-routings $ALL_ROUTINGS --repeats 3 --json $OUT/bench_moe_ti.json
fi
