#!/usr/bin/env bash
# The main job's logs in docs/logs/learning/, regenerated on this machine (CPU, about an hour on 2 cores):
# the main job timed by the shell, its plain baselines given the steps each task got, its captioning scored on
# words alone and by generated captions (training.evaluate), then prompt tuning of
# the resulting model on 1% of three tasks (the README's two commands, and Fashion-MNIST scored on 1,000 rows)
# beside a linear probe, a gated adapter and shorter schedules, and the held-out loss along the README's two
# tunings (tuning_curve.png). docs/results.md sections 6 and 7 and the
# README results table read these files.
#   bash benchmarks/main_job_logs.sh            # SKIP_PRETRAIN=1 reuses a finished outputs/pretrain-tiny
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
tune() {  # log name, then the prompt-tuning arguments
  local name=$1; shift
  python -m prompt_tuning.run_prompt_tuning --model $RUN/final --data_fraction 0.01 \
    --output_dir $TUNED/$name "$@"
  cp $TUNED/$name/results.json $LOGS/prompt_tuning_$name.json
  if [ -e $TUNED/$name/tuning_curve.png ]; then cp $TUNED/$name/tuning_curve.png $LOGS/prompt_tuning_$name.png; fi
}
tune emoji_captioning-prompt --task emoji_captioning
tune emoji_captioning-prompt-lr1e-4 --task emoji_captioning --learning_rate 1e-4
tune emoji_captioning-prompt-steps200 --task emoji_captioning --max_steps 200
tune emoji_captioning-prompt-vocabulary512 --task emoji_captioning --vocabulary_size 512
tune emoji_captioning-prompt_gate --task emoji_captioning --prompt_gate
tune emoji_captioning-prompt-fraction10 --task emoji_captioning --data_fraction 0.1  # the last flag wins
tune emoji_group_classification-prompt --task emoji_group_classification
# the README's two commands again, with the held-out loss every few steps (their metrics come out the same:
# watching changes nothing; the training time then includes the evaluations)
tune emoji_captioning-prompt-curve --task emoji_captioning --eval_steps 50
tune emoji_group_classification-prompt-curve --task emoji_group_classification --eval_steps 125
for steps in 250 500; do  # shorter schedules: where its held-out loss is lowest, and twice that
  tune emoji_group_classification-prompt-steps$steps --task emoji_group_classification --max_steps $steps
done
tune emoji_group_classification-linear_probe --task emoji_group_classification --method linear_probe
tune fashion_mnist_classification-prompt-eval1000 --task fashion_mnist_classification --eval_samples 1000
tune fashion_mnist_classification-linear_probe-eval1000 --task fashion_mnist_classification \
  --method linear_probe --eval_samples 1000
# the adapter that starts as the frozen model, and shorter schedules on the task the model pre-trained on
tune fashion_mnist_classification-prompt_gate-eval1000 --task fashion_mnist_classification --eval_samples 1000 \
  --prompt_gate
tune emoji_group_classification-prompt_gate --task emoji_group_classification --prompt_gate
for steps in 1 250 750; do
  tune fashion_mnist_classification-prompt-eval1000-steps$steps --task fashion_mnist_classification \
    --eval_samples 1000 --max_steps $steps
done
# a captioning task the model did not pre-train on: the main job with openclipart captioning at weight 0 (still
# evaluated zero-shot), then prompt tuning of that task on 1%
UNSEEN=outputs/main-no-openclipart-captioning
[ -e "$UNSEEN" ] && { echo "$UNSEEN exists: move it away (the run would resume from it)" >&2; exit 2; }
python -m training.pretrain --set output_dir=$UNSEEN --set tasks.openclipart_captioning.weight=0
cp $UNSEEN/report.json $LOGS/main_job_cpu_no_openclipart_captioning_report.json
python -m prompt_tuning.run_prompt_tuning --model $UNSEEN/final --data_fraction 0.01 \
  --task openclipart_captioning --output_dir $TUNED/openclipart_captioning-prompt-unseen
cp $TUNED/openclipart_captioning-prompt-unseen/results.json $LOGS/prompt_tuning_openclipart_captioning-prompt-unseen.json
python -m prompt_tuning.run_prompt_tuning --model $UNSEEN/final --data_fraction 0.01 --task openclipart_captioning \
  --output_dir $TUNED/openclipart_captioning-prompt-unseen-curve --eval_steps 50
cp $TUNED/openclipart_captioning-prompt-unseen-curve/results.json \
  $LOGS/prompt_tuning_openclipart_captioning-prompt-unseen-curve.json
cp $TUNED/openclipart_captioning-prompt-unseen-curve/tuning_curve.png \
  $LOGS/prompt_tuning_openclipart_captioning-prompt-unseen-curve.png
for steps in 100 300; do  # shorter schedules, where its held-out loss is lowest
  python -m prompt_tuning.run_prompt_tuning --model $UNSEEN/final --data_fraction 0.01 --task openclipart_captioning \
    --output_dir $TUNED/openclipart_captioning-prompt-unseen-steps$steps --max_steps $steps
  cp $TUNED/openclipart_captioning-prompt-unseen-steps$steps/results.json \
    $LOGS/prompt_tuning_openclipart_captioning-prompt-unseen-steps$steps.json
done
