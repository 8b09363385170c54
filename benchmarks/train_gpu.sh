#!/usr/bin/env bash
# Trainer throughput on the GPU machine (device tool). Carry: .whl (bash benchmarks/gpu_wheels.sh) and
# data_cache/small (python -m training.build_data --slice small).
#   bash benchmarks/train_gpu.sh <steps> <processes> <size...>
# Prints samples/s too: every task's rows per step, over all processes.
# TASK_SAMPLING (default shared: one task per step on every process, as docs/training.md's table) may be
# per_process. EXTRA (default empty) adds --set arguments to every run; TAG (default empty) is appended to the
# run folders' names, so several calls can write beside each other. COMPILE (default false: these runs are
# short) sets train.compile.
# Writes each run's output dir and log under $OUT and prints a table of tokens/s.
set -o pipefail
STEPS=${1:-100}; NPROC=${2:-1}; shift 2; SIZES=${@:-ti b}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))" || exit 1
# A task's batch_size in the config is its global batch, split across the processes; N processes get N times
# each task's batch (the same batch per GPU) unless GLOBAL_BATCH=1 keeps the config's global batch.
PER_GPU=""
if [ "$NPROC" != 1 ] && [ "${GLOBAL_BATCH:-0}" != 1 ]; then
  PER_GPU=$(python3 -c "import yaml; tasks = yaml.safe_load(open('training/configs/gpu_b.yaml'))['tasks']
print(' '.join(f'--set tasks.{name}.batch_size={spec[\"batch_size\"] * $NPROC}' for name, spec in tasks.items()))") || exit 1
fi
for SIZE in $SIZES; do
  RUN=$OUT/${SIZE}_${NPROC}gpu${TAG:+_$TAG}
  ARGS="--config training/configs/gpu_b.yaml $PER_GPU --set model.model_size=$SIZE --set output_dir=$RUN --set train.max_steps=$STEPS --set train.warmup_steps=10 --set train.eval_every=0 --set train.save_every=0 --set data.eval_samples=128 --set train.tracker=null --set data.task_sampling=${TASK_SAMPLING:-shared} --set train.compile=${COMPILE:-false} ${EXTRA:-}"
  if [ "$NPROC" = 1 ]; then
    python3 -m training.pretrain $ARGS > $RUN.log 2>&1
  else
    accelerate launch --multi_gpu --num_processes $NPROC --mixed_precision bf16 -m training.pretrain $ARGS > $RUN.log 2>&1
  fi
  echo "exit $? for $SIZE"; tail -c 1500 $RUN.log | tr '\r' '\n' | tail -16
  rm -rf $RUN/checkpoints $RUN/final/model.safetensors
  SCALE=$([ -n "$PER_GPU" ] && echo $NPROC || echo 1)
  python3 - "$RUN" $SCALE >> $OUT/summary.txt <<'PY'
import json, os, statistics, sys, yaml
run, scale = sys.argv[1], int(sys.argv[2])
batch = {name: spec["batch_size"] * scale
         for name, spec in yaml.safe_load(open("training/configs/gpu_b.yaml"))["tasks"].items()}
rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
windows, tasks = [], []
for row in rows:
    if "task" in row:
        tasks.append(batch[row["task"]])
    elif "steps_per_second" in row:  # a logged window: its steps' global rows per second
        windows.append((row["tokens_per_second"], row["steps_per_second"],
                        row["steps_per_second"] * statistics.mean(tasks), row.get("peak_memory_gib", 0)))
        tasks = []
windows = windows[1:]  # the first window holds the start-up
median = lambda i: statistics.median(w[i] for w in windows)
print(f"{os.path.basename(run):28s} {median(0):13.0f} {median(1):15.2f} {median(2):14.0f} {max(w[3] for w in windows):9.1f}")
PY
done
echo "run                          median tok/s  median steps/s  median rows/s  peak GiB"
cat $OUT/summary.txt
