#!/usr/bin/env bash
# The main job's logs in docs/logs/learning/, regenerated on this machine (CPU, about an hour on 2 cores):
# the main job timed by the shell, its plain baselines given the steps each task got, its captioning scored on
# words alone and by generated captions (training.evaluate), then prompt tuning of the resulting model on 1% of
# three tasks (the README's command, and Fashion-MNIST scored on 1,000 rows), each with its defaults (the step
# chosen on validation rows) beside the reference's whole schedule (--validation_fraction 0), a linear probe
# and a gated adapter, and the held-out loss along the whole schedule (tuning_curve.png); then a second main
# job without openclipart captioning and prompt tuning of that task. docs/results.md sections 6 and 7 and the
# README results table read these files.
#   bash benchmarks/main_job_logs.sh            # SKIP_PRETRAIN=1 reuses both finished main jobs
set -euo pipefail
LOGS=docs/logs/learning
RUN=outputs/pretrain-tiny
TUNED=outputs/prompt-tuning
if [ -z "${SKIP_PRETRAIN:-}" ]; then
  [ -e "$RUN" ] && { echo "$RUN exists: move it away (the main job would resume from it)" >&2; exit 2; }
  start=$(date +%s)
  python -m training.pretrain
  echo "main job: $(( $(date +%s) - start )) s wall" | tee $LOGS/main_job_cpu_time.txt
fi
[ -e "$RUN/final/config.json" ] || { echo "$RUN/final is missing: run the main job first" >&2; exit 2; }
python -m training.baselines --skip-model
cp $RUN/report.json $LOGS/main_job_cpu_report.json
cp $RUN/report.md $LOGS/main_job_cpu_report.md
cp $RUN/loss_curves.png $LOGS/main_job_cpu_loss_curves.png
cp $RUN/baselines/baselines.json $LOGS/main_job_cpu_baselines.json
cp $RUN/baselines/comparison.md $LOGS/main_job_cpu_comparison.md
cp $RUN/baselines/comparison.png $LOGS/main_job_cpu_comparison.png
# the main job's captioning by its words alone and by generated captions (2 beams), with the run's candidates
python -m training.evaluate --model $RUN/final --tasks emoji_captioning,openclipart_captioning \
  --vocabulary_size 512 --samples 256 --caption_beam 2 --out $RUN/evaluate
cp $RUN/evaluate/evaluation.json $LOGS/main_job_cpu_captioning.json
tune() {  # log name, then the prompt-tuning arguments; MODEL (default: the main job) is the pre-trained model
  local name=$1; shift
  python -m prompt_tuning.run_prompt_tuning --model ${MODEL:-$RUN}/final --data_fraction 0.01 \
    --output_dir $TUNED/$name "$@"
  cp $TUNED/$name/results.json $LOGS/prompt_tuning_$name.json
  if [[ $name == *-curve ]]; then cp $TUNED/$name/tuning_curve.png $LOGS/prompt_tuning_$name.png; fi
}
# "-fixed": the reference's whole schedule, its last step kept; "-curve": the held-out loss at every evaluation
# over the whole schedule (no early stop)
WHOLE="--held_out_curve --early_stopping_patience 0"
tune emoji_group_classification-prompt --task emoji_group_classification
tune emoji_group_classification-prompt-fixed --task emoji_group_classification --validation_fraction 0
tune emoji_group_classification-prompt-curve --task emoji_group_classification $WHOLE
tune emoji_group_classification-linear_probe --task emoji_group_classification --method linear_probe
tune emoji_group_classification-prompt_gate --task emoji_group_classification --prompt_gate
tune emoji_captioning-prompt --task emoji_captioning
tune emoji_captioning-prompt-fixed --task emoji_captioning --validation_fraction 0
tune emoji_captioning-prompt-curve --task emoji_captioning $WHOLE
tune emoji_captioning-prompt_gate --task emoji_captioning --prompt_gate
tune emoji_captioning-prompt-fraction10 --task emoji_captioning --data_fraction 0.1  # the last flag wins
FASHION="--task fashion_mnist_classification --eval_samples 1000"
tune fashion_mnist_classification-prompt-eval1000 $FASHION
tune fashion_mnist_classification-prompt-eval1000-fixed $FASHION --validation_fraction 0
tune fashion_mnist_classification-linear_probe-eval1000 $FASHION --method linear_probe
tune fashion_mnist_classification-prompt_gate-eval1000 $FASHION --prompt_gate
# what the freshly drawn prompts cost before any learning: one step of warm-up
tune fashion_mnist_classification-prompt-eval1000-steps1 $FASHION --max_steps 1 --validation_fraction 0
# a captioning task the model did not pre-train on: the main job with openclipart captioning at weight 0 (still
# evaluated zero-shot), then prompt tuning of that task on 1%
UNSEEN=outputs/main-no-openclipart-captioning
if [ -z "${SKIP_PRETRAIN:-}" ]; then
  [ -e "$UNSEEN" ] && { echo "$UNSEEN exists: move it away (the run would resume from it)" >&2; exit 2; }
  python -m training.pretrain --set output_dir=$UNSEEN --set tasks.openclipart_captioning.weight=0
fi
[ -e "$UNSEEN/final/config.json" ] || { echo "$UNSEEN/final is missing: run its main job first" >&2; exit 2; }
cp $UNSEEN/report.json $LOGS/main_job_cpu_no_openclipart_captioning_report.json
MODEL=$UNSEEN tune openclipart_captioning-prompt-unseen --task openclipart_captioning
MODEL=$UNSEEN tune openclipart_captioning-prompt-unseen-fixed --task openclipart_captioning --validation_fraction 0
MODEL=$UNSEEN tune openclipart_captioning-prompt-unseen-curve --task openclipart_captioning $WHOLE
