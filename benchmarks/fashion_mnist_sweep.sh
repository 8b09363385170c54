#!/usr/bin/env bash
# Recipe sweep for single-task Fashion-MNIST (training/configs/fashion_mnist_ti.yaml), runs side by side on one
# GPU machine (they are host-bound: each decodes its own images). Carry .whl and data_cache/full.
#   bash benchmarks/fashion_mnist_sweep.sh "name|--set a=b --set c=d" "name2|..." ...
# A name starting with "plain+" runs training.baselines (the plain ViT, then the model); others train the
# model only. Prints one row per run and packs every run's metrics and report into $OUT/sweep.tar.gz.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=3
CONFIG=training/configs/fashion_mnist_ti.yaml
mkdir -p /tmp/sweep
for spec in "$@"; do
  name=${spec%%|*}; args=${spec#*|}
  module=training.pretrain; [[ $name == plain+* ]] && module=training.baselines
  timeout ${RUN_LIMIT:-500} python3 -m $module --config $CONFIG --set output_dir=/tmp/sweep/$name $args > /tmp/sweep/$name.log 2>&1 &
done
wait
python3 - <<'PY'
import glob, json, os
for path in sorted(glob.glob("/tmp/sweep/*/metrics.jsonl")):
    run = os.path.basename(os.path.dirname(path))
    rows = [json.loads(l) for l in open(path)]
    evals = [(r["step"], r["eval/fashion_mnist_classification/accuracy"]) for r in rows if "eval/fashion_mnist_classification/accuracy" in r]
    speed = [r["steps_per_second"] for r in rows if "steps_per_second" in r]
    line = f"{run:28s} " + " ".join(f"{s}:{a:.4f}" for s, a in evals) + f"  {sorted(speed)[len(speed)//2] if speed else 0:.1f} steps/s"
    plain = os.path.join(os.path.dirname(path), "baselines", "baselines.json")
    if os.path.exists(plain):
        p = json.load(open(plain))["plain"]["fashion_mnist_classification"]
        line += "  | plain ViT " + " ".join(f"{c['step']}:{c['accuracy']:.4f}" for c in p["curve"])
    print(line)
PY
for f in /tmp/sweep/*.log; do tr '\r' '\n' < $f | grep -v "it/s" > $f.clean; mv $f.clean $f; done
tar czf $OUT/sweep.tar.gz -C /tmp/sweep --exclude='*.safetensors' --exclude=checkpoints .
