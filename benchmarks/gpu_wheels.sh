#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU machine's image lacks (it has torch, transformers, accelerate, peft,
# safetensors, pandas and pyarrow, and reaches no package index), for the device tool's carry: the GPU scripts
# install them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 ftfy==6.3.1 wcwidth==0.9.4 \
  open_clip_torch==3.3.0 evaluate==0.4.6
ls .whl
