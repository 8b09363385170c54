#!/usr/bin/env bash
# train.fsdp against data parallelism on the CPU: two gloo processes train the same B-width model (768 wide,
# 12 layers, attribute MoE with 4 experts every other layer) on the main job's data for STEPS steps (default
# 6), one task per step shared by both processes, without gate noise (a sharded model draws it once per
# encoder pass, a replicated one once per step), once replicated (DDP) and once sharded (train.fsdp), one
# launch after the other; then benchmarks.fsdp_report compares their losses, the parameters process 0 holds,
# its peak memory and the tokens/s.
#   bash benchmarks/fsdp_cpu.sh OUT_DIR LOG_JSON
set -euo pipefail
OUT_DIR=${1:?usage: bash benchmarks/fsdp_cpu.sh OUT_DIR LOG_JSON}
LOG=${2:?usage: bash benchmarks/fsdp_cpu.sh OUT_DIR LOG_JSON}
SETS=(--set model.hidden_size=768 --set model.num_hidden_layers=12 --set model.num_attention_heads=12
      --set train.max_steps=${STEPS:-6} --set train.warmup_steps=2 --set train.log_every=1 --set train.eval_every=0
      --set train.save_every=0 --set train.max_minutes=null --set train.tracker=null --set train.resume=none
      --set data.task_sampling=shared --set data.eval_samples=16 --set optim.eps=1e-6
      --set model.moe_router_noise_std=0)
for task in fashion_mnist_classification video_clip_classification austen_mlm kjv_mlm emoji_captioning \
    emoji_retrieval openclipart_captioning openclipart_retrieval wordnet_lexname_classification; do
  SETS+=(--set tasks.$task.batch_size=8)
done
for mode in ddp fsdp; do
  echo "== $mode"
  ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
    --master_port ${MASTER_PORT:-29551} -m training.pretrain --config training/configs/tiny_cpu.yaml "${SETS[@]}" \
    --set train.fsdp=$([ $mode = fsdp ] && echo true || echo false) --set output_dir=$OUT_DIR/$mode \
    > $OUT_DIR.$mode.log 2>&1 || { echo "$mode failed: $OUT_DIR.$mode.log"; exit 1; }
done
python -m benchmarks.fsdp_report $OUT_DIR/ddp $OUT_DIR/fsdp --json $LOG --command "bash benchmarks/fsdp_cpu.sh $*"
