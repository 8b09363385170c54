#!/usr/bin/env bash
# Several runs of one config side by side on one GPU machine (device tool; they are host-bound, each decodes
# its own data, so they share one GPU well; on a machine of several GPUs run i goes to GPU i mod the count, or
# to the i-th of GPU_ORDER, e.g. GPU_ORDER="0 1 1 1").
# Carry .whl (bash benchmarks/gpu_wheels.sh) and the data slice the config reads.
#   CONFIG=training/configs/<name>.yaml bash benchmarks/sweep_gpu.sh "name|--set a=b --set c=d" "name2|..." ...
# CONFIG defaults to training/configs/fashion_mnist_ti.yaml. A run named "plain+<rest>" also trains its plain
# baselines (training.baselines --plain-only) in a second process beside the model, then compares the two
# (training.baselines --skip-model --plain-from); other runs train the model only. RUN_LIMIT (seconds, default
# 500) bounds each process. Prints each run's held-out curve (and its plain baseline's) and packs every run's
# metrics, report and comparison into $OUT/sweep.tar.gz. INTERFERENCE_TASKS (comma-separated tasks) also runs
# training.interference on every run's final model, the runs side by side (INTERFERENCE_SAMPLES per task, default
# 100; each bounded by INTERFERENCE_LIMIT seconds, default 300; INTERFERENCE_ARGS adds options, e.g.
# "--vocabulary_size 4096") and packs its interference.json and .png. TUNE_RUNS (comma-separated task:method
# pairs, e.g. emoji_group_classification:prompt,emoji_group_classification:linear_probe) then tunes every run's
# final model on 1% of each task with prompt_tuning.run_prompt_tuning, all side by side (each bounded by
# TUNE_LIMIT seconds, default 240; TUNE_ARGS adds options), and packs each results.json. The runs are eager
# unless COMPILE=true (or auto): short runs finish sooner without the compile warm-up (docs/training.md).
# Runs write under /tmp/sweep/<name> (SWEEP_DIR), which a warm machine keeps between calls: a run stopped by
# train.max_minutes (with its checkpoint; its report.json says steps < max_steps) resumes when the same command
# is given again (its log grows); a finished one is not trained again. Interference and tuning measure finished
# runs only, each once (a tuning whose results.json is newer than the model is not run again, so a call may
# name further TUNE_RUNS of the same runs), and only this call's runs are packed.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=3
CONFIG=${CONFIG:-training/configs/fashion_mnist_ti.yaml}
EAGER=(--set train.compile=${COMPILE:-false})
SWEEP=${SWEEP_DIR:-/tmp/sweep}
mkdir -p $SWEEP
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPUS=$(( GPUS > 0 ? GPUS : 1 ))
side_by_side() {  # name, then --set arguments: the model and its plain baselines at once, then the comparison
  local name=$1; shift
  timeout ${RUN_LIMIT:-500} python3 -m training.pretrain --config $CONFIG "${EAGER[@]}" --set output_dir=$SWEEP/$name \
    "$@" > $SWEEP/$name.log 2>&1 &
  timeout ${RUN_LIMIT:-500} python3 -m training.baselines --plain-only --config $CONFIG "${EAGER[@]}" \
    --set output_dir=$SWEEP/$name.plain "$@" > $SWEEP/$name.plain.log 2>&1 &
  wait
  python3 -m training.baselines --skip-model --plain-from $SWEEP/$name.plain --config $CONFIG "${EAGER[@]}" \
    --set output_dir=$SWEEP/$name "$@" >> $SWEEP/$name.log 2>&1
}
finished() {  # run $1 wrote its final model at its last step (not where train.max_minutes stopped it)
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); sys.exit(r['steps'] != r.get('max_steps'))" \
    $SWEEP/$1/report.json 2>/dev/null
}
read -r -a order <<< "${GPU_ORDER:-}"
index=0
names=()
for spec in "$@"; do
  name=${spec%%|*}; read -r -a args <<< "${spec#*|}"
  names+=("$name")
  [[ $spec == *"|"* ]] || args=()
  export CUDA_VISIBLE_DEVICES=${order[index]:-$(( index % GPUS ))}
  index=$(( index + 1 ))
  if finished $name; then
    echo "$name: finished in an earlier call"
  elif [[ $name == plain+* ]]; then
    side_by_side "$name" "${args[@]}" &
  else
    timeout ${RUN_LIMIT:-500} python3 -m training.pretrain --config $CONFIG "${EAGER[@]}" \
      --set output_dir=$SWEEP/$name "${args[@]}" >> $SWEEP/$name.log 2>&1 &
  fi
done
wait
unset CUDA_VISIBLE_DEVICES
if [ -n "${INTERFERENCE_TASKS:-}" ]; then  # the interference matrix of every finished run, side by side
  for name in "${names[@]}"; do
    run=$SWEEP/$name/final
    finished $name && [ ! $SWEEP/$name/interference/interference.json -nt $run/config.json ] || continue
    timeout ${INTERFERENCE_LIMIT:-300} python3 -m training.interference --model $run --tasks $INTERFERENCE_TASKS \
      --samples ${INTERFERENCE_SAMPLES:-100} --out $(dirname $run)/interference ${INTERFERENCE_ARGS:-} \
      > $(dirname $run).interference.log 2>&1 &
  done
  wait
fi
if [ -n "${TUNE_RUNS:-}" ]; then  # every finished run tuned on 1% of each task:method of TUNE_RUNS, side by side
  for name in "${names[@]}"; do
    run=$SWEEP/$name/final
    finished $name || continue
    for pair in ${TUNE_RUNS//,/ }; do
      task=${pair%%:*}; method=${pair#*:}
      [ ! $(dirname $run)/tune-$task-$method/results.json -nt $run/config.json ] || continue  # tuned earlier
      timeout ${TUNE_LIMIT:-240} python3 -m prompt_tuning.run_prompt_tuning --model $run --task $task \
        --data_fraction 0.01 --method $method --output_dir $(dirname $run)/tune-$task-$method ${TUNE_ARGS:-} \
        > $(dirname $run).tune-$task-$method.log 2>&1 &
    done
  done
  wait
fi
packed=$(mktemp -d)
for name in "${names[@]}"; do  # this call's runs and their logs, without the weights
  for f in $SWEEP/$name.*log; do
    [ ! -e $f ] || tr '\r' '\n' < $f | grep -v "it/s" > $packed/$(basename $f)
  done
  for dir in $name $name.plain; do
    [ ! -d $SWEEP/$dir ] || tar cf - -C $SWEEP --exclude='*.safetensors' --exclude=checkpoints --exclude=final \
      --exclude=processor $dir | tar xf - -C $packed
  done
done
python3 -m benchmarks.sweep_summary $packed
tar czf $OUT/sweep.tar.gz -C $packed .
