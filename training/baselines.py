"""Plain baselines, trained and measured in the same run as the model, side by side.

    python -m training.baselines [--config training/configs/<name>.yaml] [--set section.field=value ...]
                                 [--skip-model] [--plain-only] [--plain-from DIR]

For every image classification task a `ViTForImageClassification`, for every text classification task a
`BertForSequenceClassification` and for every MLM task a `BertForMaskedLM` (scored over the same candidate
words), built from a transformers config of the model's width, depth, heads, MLP width, image and patch size
(nothing pre-trained). Each is trained on the
same stream of rows as the model sees for that task (same seed, shuffle, batch size and augmentation), for
as many optimizer steps as the task gets in the run (the steps on which the multi-task sampler draws it),
with the same AdamW parameter groups, warmup + cosine schedule, gradient clipping and mixed precision, and
evaluated on the same held-out rows. Every task also gets its trivial baseline (`evaluation.trivial_baseline`).
Then the Uni-Perceiver model is trained with the config (`--skip-model` reuses `<output_dir>/report.json`).

To train the model and its baselines side by side in two processes: `python -m training.pretrain` in one,
`python -m training.baselines --plain-only --set output_dir=<other dir>` in the other (the plain and trivial
baselines only), then `python -m training.baselines --skip-model --plain-from <other dir>` compares them
without training anything.

Writes `<output_dir>/baselines/` (`baselines.json`, `comparison.md`, `comparison.png`) and prints the table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from modeling_uniperceiver_moe.command_line import parse_script_arguments

from .config import RunArguments

PLAIN_FAMILIES = ("image_classification", "text_classification", "mlm")
PLAIN_NAMES = {"image_classification": "ViTForImageClassification",
               "text_classification": "BertForSequenceClassification", "mlm": "BertForMaskedLM"}


# --------------------------------------------------------------------------------------------- plain models
class PlainBaseline(torch.nn.Module):
    """A transformers model with the Uni-Perceiver encoder's shape, randomly initialised, scored on the same
    candidates as the model: `forward(batch) -> (logits [N, K], labels [N])` over the N answers of a
    `TaskBatch` (one per sample for classification, one per masked word for MLM).

    image_classification: `ViTForImageClassification` (linear head on [CLS]); text_classification:
    `BertForSequenceClassification`; mlm: `BertForMaskedLM`, its output restricted to the run's candidate
    vocabulary at the masked positions.
    """

    def __init__(self, family: str, model_config, num_labels: int, vocabulary: torch.Tensor | None = None):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, ViTConfig, ViTForImageClassification

        self.family = family
        shape = dict(hidden_size=model_config.hidden_size, num_hidden_layers=model_config.num_hidden_layers,
                     num_attention_heads=model_config.num_attention_heads,
                     intermediate_size=model_config.intermediate_size, hidden_act="gelu",
                     layer_norm_eps=model_config.layer_norm_eps)
        text = dict(vocab_size=model_config.vocab_size, max_position_embeddings=model_config.max_position_embeddings,
                    pad_token_id=model_config.pad_token_id, **shape)
        if family == "image_classification":
            self.model = ViTForImageClassification(ViTConfig(
                image_size=model_config.image_size, patch_size=model_config.patch_size,
                num_channels=model_config.num_channels, num_labels=num_labels, **shape))
        elif family == "text_classification":
            self.model = BertForSequenceClassification(BertConfig(num_labels=num_labels, **text))
        elif family == "mlm":
            self.model = BertForMaskedLM(BertConfig(**text))
            self.register_buffer("vocabulary", vocabulary.clone(), persistent=False)
        else:
            raise ValueError(f"no plain baseline for the {family} family")

    def forward(self, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch.inputs, batch.labels.to(device)
        if self.family == "image_classification":
            return self.model(pixel_values=inputs["pixel_values"].to(device)).logits, labels.reshape(-1)
        text = {"input_ids": inputs["input_ids"].to(device), "attention_mask": inputs["attention_mask"].to(device)}
        if self.family == "text_classification":
            return self.model(**text).logits, labels.reshape(-1)
        queries = inputs["query_positions"].to(device)
        keep = queries >= 0
        hidden = self.model.bert(**text).last_hidden_state  # [B, T, d]
        rows = torch.arange(len(queries), device=device)[:, None].expand_as(queries)[keep]
        # the MLM head on the masked positions only (not on every token of the 49k-word output layer)
        return self.model.cls(hidden[rows, queries[keep]])[:, self.vocabulary], labels[keep]


def plain_accuracy(model, task, rows: list[dict], ctx, device, autocast_dtype) -> dict:
    """The plain model on the held-out rows, through the model's evaluation (`evaluation.evaluate_task`)."""
    from .evaluation import evaluate_task, headline

    metrics = evaluate_task(model, task, rows, ctx, device, autocast_dtype=autocast_dtype,
                            answers=lambda batch: model(batch, device))
    return {"accuracy": headline(task, metrics)[1], "evaluated": metrics["evaluated"],
            "distinct_predictions": metrics["distinct_predictions"]}


def train_plain(trainer, name: str, steps: int, device) -> dict:
    """Train the plain baseline of task `name` for `steps` optimizer steps the way `trainer` trains the model."""
    from .data import MultiTaskLoader, TaskEntry, TaskStream
    from .trainer import cosine_with_warmup, make_optimizer, task_stream_spec

    config, task = trainer.config, trainer.tasks[name]
    task_config = config.tasks[name]
    torch.manual_seed(config.seed)
    num_labels = len(trainer.ctx.label_names.get(name) or []) or None
    model = PlainBaseline(task.family, trainer.model_config, num_labels, trainer.ctx.vocabulary).to(device)
    spec = task_stream_spec(name, task_config, trainer.data_dir, trainer.manifest, "train")
    stream = TaskStream(name, spec, config.seed, config.data.shuffle_block)
    loader = MultiTaskLoader([TaskEntry(task, 1.0, task_config.batch_size, stream)], trainer.ctx, config.seed,
                             on_bad_sample=config.data.on_bad_sample, augment=config.data.augment)
    optim = config.optim
    optimizer = make_optimizer(model, optim, device)
    warmup = min(config.train.warmup_steps, steps)
    scheduler = cosine_with_warmup(optimizer, warmup, steps, config.train.min_lr_ratio)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    eval_rows = trainer.eval_rows()[name]
    curve, started = [], time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc=f"plain {name}", dynamic_ncols=True):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, labels = model(loader.batch(step), device)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        every = config.train.eval_every
        if every and (step + 1) % every == 0 and step + 1 < steps:
            curve.append({"step": step + 1, **plain_accuracy(model, task, eval_rows, trainer.ctx, device, dtype)})
    final = plain_accuracy(model, task, eval_rows, trainer.ctx, device, dtype)
    curve.append({"step": steps, **final})
    return {"model": PLAIN_NAMES[task.family], "steps": steps, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - started, **final, "curve": curve}


# --------------------------------------------------------------------------------------------- comparison
# Settings that change what a plain baseline is trained on; an earlier run's baselines are reused only
# when these agree (the output directory, logging and evaluation cadence may differ).
PLAIN_RUN_SECTIONS = ("seed", "data", "optim", "tasks")
PLAIN_RUN_SETTINGS = tuple(f"model.{key}" for key in (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
    "num_channels", "max_position_embeddings", "model_size")) + tuple(f"train.{key}" for key in (
    "max_steps", "warmup_steps", "min_lr_ratio", "grad_accum", "mixed_precision"))


def load_plain_run(directory: str, config) -> dict:
    """The plain baselines of an earlier `--plain-only` run in `directory`, after checking it trained them
    the way `config` would (raises `ConfigError` naming the settings that differ)."""
    from .config import ConfigError, changed_settings

    path = os.path.join(directory, "baselines", "baselines.json")
    if not os.path.exists(path):
        raise ConfigError(f"--plain-from: {path} does not exist (run --plain-only with output_dir={directory})")
    with open(path) as handle:
        earlier = json.load(handle)
    differing = [key for key in changed_settings(earlier["config"], config.to_dict())
                 if key.split(".")[0] in PLAIN_RUN_SECTIONS or key in PLAIN_RUN_SETTINGS]
    if differing:
        raise ConfigError(f"--plain-from: the baselines in {path} were trained with different settings "
                          f"({', '.join(differing)})")
    return earlier["plain"]


def task_steps(trainer) -> dict[str, int]:
    """Optimizer steps on which the run's sampler draws each task (one task per step)."""
    counts = dict.fromkeys(trainer.tasks, 0)
    accum = trainer.config.train.grad_accum
    for micro_step in range(trainer.config.train.max_steps * accum):
        counts[trainer.loader.task_for_step(micro_step)] += 1
    return {name: count // accum for name, count in counts.items()}


def comparison_rows(tasks: dict, model_report: dict, plain: dict, trivial: dict) -> list[dict]:
    ours = {row["task"]: row for row in model_report["tasks"]}
    rows = []
    for name, task in tasks.items():
        mine = ours.get(name, {})
        base = plain.get(name)
        value = mine.get("value")
        rows.append({
            "task": name, "metric": trivial[name]["metric"], "model": value,
            "model_distinct": mine.get("distinct_predictions"),
            "plain": None if base is None else base["accuracy"],
            "plain_model": None if base is None else base["model"],
            "plain_steps": None if base is None else base["steps"],
            "model_vs_plain": None if base is None or value is None or not base["accuracy"] else value / base["accuracy"],
            "trivial": trivial[name]["value"],
        })
    return rows


def format_table(rows: list[dict], steps: int, model_trained: bool = True) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    first = (f"Model trained {steps} steps; each plain baseline the steps its task got (column steps)."
             if model_trained else
             f"Baselines only (--plain-only): each plain baseline trained the steps its task gets in a {steps}-step run.")
    lines = [first, "",
             "| task | metric | this model | distinct answers | plain baseline | steps | model / plain | trivial baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plain = "-" if r["plain"] is None else f"{r['plain']:.3f} ({r['plain_model']})"
        lines.append(f"| {r['task']} | {r['metric']} | {fmt(r['model'])} | {r['model_distinct'] or '-'} | {plain} "
                     f"| {r['plain_steps'] or '-'} | {fmt(r['model_vs_plain'])} | {fmt(r['trivial'])} |")
    return "\n".join(lines) + "\n"


def plot_comparison(curves: dict, plain: dict, rows: list[dict], path: str) -> bool:
    """Held-out headline metric against steps: the model (solid), its plain baseline (dotted), the trivial
    baseline (dashed), one colour per task; the legend outside the axes."""
    from .report import offscreen_pyplot

    plt = offscreen_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, row in enumerate(rows):
        colour = plt.cm.tab10(i % 10)
        name = row["task"]
        if curves.get(name):
            steps, values = zip(*curves[name])
            ax.plot(steps, values, "o-", color=colour, label=f"{name}: this model")
        if name in plain:
            points = [(p["step"], p["accuracy"]) for p in plain[name]["curve"]]
            steps, values = zip(*points)
            ax.plot(steps, values, "s:", color=colour, label=f"{name}: {plain[name]['model']}")
        ax.axhline(row["trivial"], color=colour, linestyle="--", linewidth=1, label=f"{name}: trivial baseline")
    ax.set(xlabel="optimizer step (the plain baselines: steps of their task)", ylabel="held-out metric",
           ylim=(0, 1), title="model vs plain and trivial baselines")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@dataclass
class BaselinesArguments(RunArguments):
    """`RunArguments` plus what to train: the model and its baselines, the baselines only, or neither."""

    skip_model: bool = field(default=False, metadata={
        "help": "do not train the model; compare with <output_dir>/report.json of an earlier run"})
    plain_only: bool = field(default=False, metadata={
        "help": "train and score the plain and trivial baselines only (no model, no comparison)"})
    plain_from: Optional[str] = field(default=None, metadata={
        "metavar": "DIR", "help": "reuse the plain baselines of an earlier --plain-only run of the same config in DIR"})


def main(argv=None) -> dict:
    args = parse_script_arguments(BaselinesArguments, argv, prog="python -m training.baselines", description=__doc__)
    if args.plain_only and (args.skip_model or args.plain_from):
        print("error: --plain-only trains the plain baselines; it takes neither --skip-model nor --plain-from",
              file=sys.stderr)
        raise SystemExit(2)

    from .config import ConfigError
    from .report import held_out_curves
    from .trainer import Pretrainer

    try:
        config = args.load()
        report_path = os.path.join(config.output_dir, "report.json")
        if args.skip_model and not os.path.exists(report_path):
            raise ConfigError(f"--skip-model needs {report_path} from an earlier run of this config")
        earlier_plain = load_plain_run(args.plain_from, config) if args.plain_from else None
        trainer = Pretrainer(config)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    device = trainer.accelerator.device
    steps = task_steps(trainer)
    trivial = trainer.trivial_baselines()
    if earlier_plain is not None:
        plain = earlier_plain
    else:
        plain = {name: train_plain(trainer, name, steps[name], device)
                 for name, task in trainer.tasks.items() if task.family in PLAIN_FAMILIES and steps[name] > 0}
    if args.plain_only:
        model_report, history = {"tasks": []}, []
    elif args.skip_model:
        with open(report_path) as handle:
            model_report = json.load(handle)
        with open(os.path.join(config.output_dir, "metrics.jsonl")) as handle:
            history = [json.loads(line) for line in handle]
    else:
        trainer.train()
        with open(report_path) as handle:
            model_report = json.load(handle)
        history = trainer.history
    rows = comparison_rows(trainer.tasks, model_report, plain, trivial)
    out = os.path.join(config.output_dir, "baselines")
    os.makedirs(out, exist_ok=True)
    table = format_table(rows, config.train.max_steps, model_trained=not args.plain_only)
    result = {"config": config.to_dict(), "rows": rows, "plain": plain, "trivial": trivial}
    with open(os.path.join(out, "baselines.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    with open(os.path.join(out, "comparison.md"), "w") as handle:
        handle.write("# Model vs baselines\n\n" + table)
    plot_comparison(held_out_curves(history, trainer.tasks), plain, rows, os.path.join(out, "comparison.png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
