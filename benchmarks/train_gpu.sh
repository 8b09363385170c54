#!/usr/bin/env bash
# Trainer throughput on the GPU machine (device tool). Carry: .whl (datasets, dill, multiprocess, ftfy, wcwidth,
# open-clip-torch wheels) and data_cache/small (python -m training.build_data --slice small).
#   bash benchmarks/train_gpu.sh <steps> <processes> <size...>
# TASK_SAMPLING (default shared: one task per step on every process, as docs/training.md's table) may be
# per_process. EXTRA (default empty) adds --set arguments to every run.
# Writes each run's output dir and log under $OUT and prints a table of tokens/s.
set -o pipefail
STEPS=${1:-100}; NPROC=${2:-1}; shift 2; SIZES=${@:-ti b}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))" || exit 1
for SIZE in $SIZES; do
  RUN=$OUT/${SIZE}_${NPROC}gpu
  ARGS="--config training/configs/gpu_b.yaml --set model.model_size=$SIZE --set output_dir=$RUN --set train.max_steps=$STEPS --set train.warmup_steps=10 --set train.eval_every=0 --set train.save_every=0 --set data.eval_samples=128 --set train.tracker=null --set data.task_sampling=${TASK_SAMPLING:-shared} ${EXTRA:-}"
  if [ "$NPROC" = 1 ]; then
    python3 -m training.pretrain $ARGS > $RUN.log 2>&1
  else
    accelerate launch --multi_gpu --num_processes $NPROC --mixed_precision bf16 -m training.pretrain $ARGS > $RUN.log 2>&1
  fi
  echo "exit $? for $SIZE"; tail -c 1500 $RUN.log | tr '\r' '\n' | tail -16
  rm -rf $RUN/checkpoints $RUN/final/model.safetensors
done
python3 - "$OUT" <<'PY'
import json, glob, os, sys, statistics
print(f"{'run':14s} {'steps':>5s} {'median tok/s':>13s} {'median steps/s':>15s} {'peak GiB':>9s}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*gpu", "metrics.jsonl"))):
    rows = [json.loads(l) for l in open(path)]
    tps = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][1:]  # first window includes warm-up
    sps = [r["steps_per_second"] for r in rows if "steps_per_second" in r][1:]
    mem = max([r.get("peak_memory_gib", 0) for r in rows] or [0])
    run = os.path.basename(os.path.dirname(path))
    print(f"{run:14s} {len([r for r in rows if 'loss' in r]):5d} {statistics.median(tps) if tps else 0:13.0f} {statistics.median(sps) if sps else 0:15.2f} {mem:9.1f}")
PY
