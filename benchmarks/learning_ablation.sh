#!/usr/bin/env bash
# What makes the model learn from scratch: single-task Fashion-MNIST on the CPU
# (training/configs/fashion_mnist_tiny.yaml, 300 steps of 32), once per variant, one row each:
# held-out accuracy after 100/200/300 steps and the training loss every 50 steps.
#   bash benchmarks/learning_ablation.sh [outdir]
OUT_DIR=${1:-outputs/learning-ablation}
mkdir -p "$OUT_DIR"
run() {
  name=$1; shift
  args=(); for a in "$@"; do args+=(--set "$a"); done
  python -m training.pretrain --config training/configs/fashion_mnist_tiny.yaml --set output_dir="$OUT_DIR/$name" \
    --set train.resume=none "${args[@]}" > "$OUT_DIR/$name.log" 2>&1 || { echo "$name failed: $OUT_DIR/$name.log"; return; }
  python - "$OUT_DIR/$name/metrics.jsonl" "$name" "$*" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
key = "fashion_mnist_classification"
acc = [f"{r[f'eval/{key}/accuracy']:.3f}" for r in rows if f"eval/{key}/accuracy" in r]
loss = [f"{r[f'train_loss/{key}']:.2f}" for r in rows if f"train_loss/{key}" in r]
print(f"| {sys.argv[2]} | {sys.argv[3] or 'defaults'} | {' / '.join(acc)} | {' '.join(loss)} |")
PY
}
echo "| variant | settings | accuracy at 100 / 200 / 300 steps | training loss every 50 steps |"
echo "|---|---|---|---|"
run defaults
run reference_init model.layer_scale_init=1.0e-3 model.initializer_scheme=fixed
run fixed_ls0.1 model.layer_scale_init=0.1 model.initializer_scheme=fixed
run fixed_ls1 model.initializer_scheme=fixed
run fixed_ls1_scale100 model.initializer_scheme=fixed model.logit_scale_init=4.605
run fan_in_ls0.1 model.layer_scale_init=0.1
run fan_in_ls1e-3 model.layer_scale_init=1.0e-3
run clip0.1 optim.grad_clip=0.1
run dense model.moe_routing=none
