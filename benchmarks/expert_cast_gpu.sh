#!/usr/bin/env bash
# GPU measurements of the expert cast (once per step vs once per pass) and training profiles, in parts that each fit one
# device-tool call (10 minutes at most; each B training variant took 100-150 s to compile under CUDA
# graphs when measured).
#
#   bash benchmarks/expert_cast_gpu.sh 1   # one expert cast per step vs one per pass, token top-2 training
#   bash benchmarks/expert_cast_gpu.sh 2   # the same for token top-1 training
#   bash benchmarks/expert_cast_gpu.sh 3   # training profiles: token top-2, token top-1, dense (GPU time per step)
#
# Logs (and the bench's JSON) go to $OUT, or ./expert_cast_logs without it. Parts 1 and 2 end with the
# bench's table of ratios to dense measured in that run; part 3 prints each profile's summary.
# DRY=1 runs the same commands at the tiny size on the CPU without compiling, which checks the flags
# and variant names, not the speed.
set -o pipefail
PART=${1:?usage: expert_cast_gpu.sh 1|2|3}
LOGS=${OUT:-expert_cast_logs}; mkdir -p "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# lines the compile and the profiler repeat many times; the full output stays in the log
NOISE='Extern Choice|select_algorithm|UserWarning|warn_once|This call|File "/opt|return x|warnings.warn|lru_cache|^$'

if [ -n "$DRY" ]; then
  SIZE=(--sizes tiny --batch 2 --image-size 32 --steps 1 --warmup 0)
  PROFILE_SIZE=(--size tiny --batch 2 --image-size 32)
  compiled() { :; }
else
  SIZE=(--sizes b --repeats 2)
  PROFILE_SIZE=(--size b)
  compiled() { echo --compile "$1" --compiled-only --compile-mode reduce-overhead; }
fi

bench() {  # bench NAME ROUTINGS: training only, every routing compiled with CUDA graphs (eager with DRY)
  python -m benchmarks.bench_moe "${SIZE[@]}" --routings "$2" --infer-routings "" $(compiled "$2") \
    --json "$LOGS/$1.json" 2>&1 | tee "$LOGS/$1.log" | grep --line-buffered -Ev "$NOISE"
  echo "exit ${PIPESTATUS[0]} for $1"
}

profile() {  # profile NAME ARGS...: a training step under torch.profiler
  local name=$1; shift
  local flags=(); [ -z "$DRY" ] && flags=(--compile --compile-mode reduce-overhead)
  python -m benchmarks.profile_step "${PROFILE_SIZE[@]}" "$@" "${flags[@]}" > "$LOGS/$name.log" 2>&1
  echo "exit $? for $name"; grep -Ev "$NOISE" "$LOGS/$name.log" | head -30  # the summary and the top ops
}

case $PART in
  1) bench shared_cast_top2 none,token,token-passcast ;;
  2) bench shared_cast_top1 none,token-top1,token-top1-passcast ;;
  3) profile profile_token_top2_train --routing token
     profile profile_token_top1_train --routing token --top-k 1
     profile profile_none_train --routing none ;;
  *) echo "unknown part '$PART': use 1, 2 or 3" >&2; exit 2 ;;
esac
