"""Held-out evaluation of a trained model on any registered tasks, without training: the zero-shot reading of
a task left out of pre-training, and the final metrics of an ablation's models side by side.

    python -m training.evaluate --model DIR --tasks t1,t2,... --out DIR [--samples 256] [--caption_beam 2]
                                [--vocabulary_size 1024] [--end_token_candidate true] [--split test]
                                [--device cuda]

Each task runs through pre-training's own evaluation (`training.evaluation.evaluate_task`: accuracy; masked-
or next-word accuracy with the perplexity over the candidate words; recall@1/5 in both directions) on the
first `--samples` rows of its split, beside its trivial baseline (the answer most frequent among the first
`BASELINE_TRAIN_ROWS` training rows; chance recall for retrieval). `--caption_beam N` also generates each
captioning task's captions with N beams and scores BLEU-4 and CIDEr-D. Writes `evaluation.json`
(`{"model", "split", "vocabulary_size", "tasks": {task: {metric: value, ..., "trivial_baseline"}}}`) and
prints a table. `--vocabulary_size` and `--end_token_candidate` should be the `data.vocabulary_size` and
`data.end_token_candidate` the model was trained with: they set the MLM and caption candidates.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from modeling_uniperceiver_moe.command_line import parse_script_arguments

from .evaluation import (BASELINE_TRAIN_ROWS, SECONDARY_METRICS, SavedModelTasksArguments, answer_counts,
                         caption_generation_scores, evaluate_task, headline, model_for_tasks, task_context,
                         trivial_baseline)


@dataclass
class EvaluateArguments(SavedModelTasksArguments):
    samples: int = field(default=256, metadata={"help": "rows per task (the first of its split)"})
    split: str = field(default="test", metadata={"choices": ["train", "test"], "help": "rows of this split"})
    caption_beam: int = field(default=0, metadata={
        "help": "> 0: also generate captions with this many beams and score BLEU-4 and CIDEr-D"})
    seed: int = field(default=0, metadata={"help": "draws the words MLM rows hide (a run's seed gives its own)"})


def format_table(results: dict[str, dict], tasks) -> str:
    lines = ["| task | metric | value | trivial baseline | distinct answers | evaluated | other |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        metrics = results[task.name]
        key, value = headline(task, metrics)
        shown = [n for m in SECONDARY_METRICS for n in ((m, "word_trivial_baseline") if m == "word_accuracy" else (m,))]
        other = ", ".join(f"{name} {metrics[name]:.3f}" for name in shown if name in metrics)
        lines.append(f"| {task.name} | {key} | {value:.3f} | {metrics['trivial_baseline']:.3f} | "
                     f"{metrics['distinct_predictions']} | {metrics['evaluated']} | {other or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    args = parse_script_arguments(EvaluateArguments, argv, prog="python -m training.evaluate", description=__doc__)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise SystemExit(f"error: --tasks needs one or more different tasks, got {names}")
    if args.samples < 1:
        raise SystemExit(f"error: --samples must be >= 1, got {args.samples}")
    if args.caption_beam < 0:
        raise SystemExit(f"error: --caption_beam must be >= 0, got {args.caption_beam}")
    model = model_for_tasks(args.model, names)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    ctx, tasks, read = task_context(args.model, model.config, names, args.slice, args.data_cache,
                                    args.vocabulary_size, args.seed, args.end_token_candidate)
    results = {}
    for task in tqdm(tasks, desc="evaluate", unit="task"):
        rows = read(task, args.split, args.samples)
        if not rows:
            raise SystemExit(f"error: task {task.name!r} has no rows in its {args.split} split")
        metrics = evaluate_task(model, task, rows, ctx, device)
        counts = None if task.family == "retrieval" else answer_counts(task, read(task, "train", BASELINE_TRAIN_ROWS), ctx)
        baseline = trivial_baseline(task, counts, rows, ctx)
        metrics["trivial_baseline"] = baseline["value"]
        if "word_value" in baseline:
            metrics["word_trivial_baseline"] = baseline["word_value"]
        if args.caption_beam and task.family == "captioning":
            scores = caption_generation_scores(model, task, rows, ctx, device, beam_size=args.caption_beam)
            metrics.update(bleu4=scores["bleu4"], cider=scores["cider"], caption_examples=scores["examples"])
        results[task.name] = metrics
    os.makedirs(args.out, exist_ok=True)
    written = {"model": args.model, "split": args.split, "vocabulary_size": args.vocabulary_size,
               "end_token_candidate": args.end_token_candidate,
               "caption_beam": args.caption_beam, "tasks": results}
    with open(os.path.join(args.out, "evaluation.json"), "w", encoding="utf-8") as handle:
        json.dump(written, handle, indent=1)
    print(format_table(results, tasks))
    return written


if __name__ == "__main__":
    main()
