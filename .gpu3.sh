#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the trainer's defaults on a GPU (compiled layer by layer, CUDA graphs, static shapes over bucketed text);
# Ti and B dense in one process, each with 1 and 3 data worker processes
timeout 555 python3 -m benchmarks.bench_trainer --sizes ti,b --routings none --prefetch-processes 1,3 \
  --warmup 70 --steps 200 --profile-steps 10 --profile-ops 12 --json $OUT/dense.json > $OUT/dense.log 2>&1
echo "exit $?"; grep -v "^\[" $OUT/dense.log | grep "^| \(ti\|b\) " | sort -u; grep "warm-up done\|measured steps done\|bare model steps" $OUT/dense.log
