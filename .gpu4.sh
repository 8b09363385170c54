#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Ti attribute with the trainer's GPU defaults and 3 data worker processes
timeout 320 python3 -m benchmarks.bench_trainer --sizes ti --routings attribute --prefetch-processes 3 \
  --warmup 70 --steps 200 --profile-steps 10 --profile-ops 12 --json $OUT/attribute.json > $OUT/attribute.log 2>&1
echo "exit $?"; grep -v "^\[" $OUT/attribute.log | grep "^| ti " | sort -u; grep "warm-up done\|measured steps done\|bare model steps" $OUT/attribute.log
