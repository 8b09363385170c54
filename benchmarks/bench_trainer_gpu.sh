#!/usr/bin/env bash
# bench_trainer on the GPU machine (device tool), one benchmark process per call of this script. Carry: .whl
# (bash benchmarks/gpu_wheels.sh) and data_cache/small.
#   bash benchmarks/bench_trainer_gpu.sh <name> <seconds> <bench_trainer arguments...>
# e.g. bash benchmarks/bench_trainer_gpu.sh bench_trainer_rounds_ti_h200 530 --sizes ti --routings attribute,none \
#        --warmup 300 --steps 400 --rounds 4 --profile-steps 5 --profile-ops 15
# Runs `python -m benchmarks.bench_trainer --config training/configs/gpu_b.yaml <arguments>` for at most <seconds>
# (a run stopped there keeps the variants it finished: the JSON is written after each), writing
# $OUT/<name>.json and $OUT/<name>.log, and prints the progress lines, the rounds and the rows.
set -o pipefail
NAME=${1:?name}; SECONDS_LIMIT=${2:?seconds}; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout "$SECONDS_LIMIT" python3 -m benchmarks.bench_trainer --config training/configs/gpu_b.yaml "$@" \
  --json "$OUT/$NAME.json" > "$OUT/$NAME.log" 2>&1
echo "exit $? for $NAME"
grep -E "warm-up done|steps [0-9]+-[0-9]+:|^\| " "$OUT/$NAME.log" | tail -n 30
