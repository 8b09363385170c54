#!/usr/bin/env bash
# The model beside its plain and trivial baselines on the GPU machine (device tool), one config per call.
# Carry: .whl (bash benchmarks/gpu_wheels.sh) and the data slice
# the config reads (data_cache/full after `python -m training.build_data --slice full --sources fashion_mnist`,
# or data_cache/small).
#   bash benchmarks/baselines_gpu.sh <config.yaml> [--set section.field=value ...]
# Eager unless COMPILE=true (or auto): these runs are short. Copies comparison.md, baselines.json, comparison.png, report.md, loss_curves.png and metrics.jsonl to $OUT.
set -o pipefail
CONFIG=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN=/tmp/run
python3 -m training.baselines --config "$CONFIG" --set train.compile=${COMPILE:-false} --set output_dir=$RUN "$@" > $OUT/log.txt 2>&1
status=$?
tr '\r' '\n' < $OUT/log.txt | grep -v "it/s\]$" | tail -40
for f in baselines/comparison.md baselines/baselines.json baselines/comparison.png report.md loss_curves.png metrics.jsonl; do
  [ -f $RUN/$f ] && cp $RUN/$f $OUT/
done
exit $status
