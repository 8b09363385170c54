"""Prompt-tune a pre-trained Uni-Perceiver-MoE on a fraction of a downstream task (transformers.Trainer).

    python -m prompt_tuning.run_prompt_tuning --model outputs/pretrain-tiny/final \
        --task fashion_mnist_classification --data_fraction 0.01 [--method prompt|linear_probe|full] \
        [--output_dir outputs/prompt-tuning/<task>-<method>] [--max_steps N] [--learning_rate LR] \
        [--validation_fraction 0.01] [--eval_steps N] [--early_stopping_patience 5] [--held_out_curve]
    python -m prompt_tuning.run_prompt_tuning my_run.yaml     # the same options as a YAML (or JSON) file

Options are the fields of `PromptTuningArguments`, parsed by transformers' `HfArgumentParser` as in its
Trainer example scripts (`--data-fraction` works too).

Methods: `prompt` (the paper's recipe: deep prompts, LayerNorms, SPE bias, label prompt; a PEFT adapter
saved alone), `linear_probe` (a linear classifier on frozen SPE features; classification tasks) and
`full` (every parameter). Schedules default to the reference's per task family (AdamW (0.9, 0.95), no
weight decay, grad-norm clip 0.1, cosine with warmup).

Model selection: a second sample of the training split, disjoint from the tuning rows and drawn by the
same rule (`--validation_fraction`, 1% by default), is evaluated before the first step and every
`--eval_steps` (a twentieth of the schedule by default) by the task's metric (`selection_metric`: accuracy,
CIDEr-D of generated captions, mean R@1); the tuned model is the one of the evaluation with the best
validation metric, and tuning stops after `--early_stopping_patience` evaluations without a better one.
`--validation_fraction 0` trains the whole schedule and keeps its last step.

Evaluation uses our offline `evaluate` modules: accuracy; retrieval R@1/5/10 both ways; captioning BLEU-4
and CIDEr-D on beam-search captions. The held-out metrics are measured before ("zero-shot") and after
tuning and written to `results.json` with the training time (`train_seconds`, the Trainer's own
`train_runtime`, evaluations included), the validation losses and the chosen step; `--held_out_curve`
adds the held-out loss at every evaluation (`held_out_loss`). `tuning_curve.png` plots the losses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback

# family -> (steps, learning rate, warmup): the reference's downstream recipes (notes section 4)
RECIPES = {
    "image_classification": (2500, 1e-4, 500),
    "video_classification": (2000, 5e-4, 200),
    "text_classification": (1000, 1e-3, 100),
    "captioning": (1000, 1e-3, 100),
    "retrieval": (1000, 1e-3, 100),
}
CLASSIFICATION = ("image_classification", "video_classification", "text_classification")


# --------------------------------------------------------------------------------------------- 1% sampling
def order_key(seed: int, row: dict) -> str:
    return hashlib.sha1(f"{seed}/{row.get('key', row.get('idx'))}".encode()).hexdigest()


def share_count(n: int, share: float, per_class: bool) -> int:
    """Rows taken for `share` from a group of n: floor(share * n) + 1 per class, else ceil(share * n)."""
    return int(math.floor(share * n)) + 1 if per_class else math.ceil(share * n)


def split_tuning_rows(rows: list[dict], fraction: float, validation_fraction: float, per_class: bool,
                      seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The tuning rows and, disjoint from them, the validation rows that choose when to stop.

    Rows are ordered by a keyed hash of each row's key (deterministic, independent of the input order). The
    tuning rows are the first ones: per class floor(fraction * n_c) + 1 (classification, as the reference),
    else ceil(fraction * N). The validation rows follow them in the same order, counted by the same rule
    with `validation_fraction` (none when it is 0; a class too small to spare a row gives none)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if not rows:
        raise ValueError("the training split is empty")
    ordered = sorted(rows, key=lambda r: order_key(seed, r))
    if per_class:
        groups: dict[int, list[dict]] = {}
        for row in ordered:
            groups.setdefault(int(row["label"]), []).append(row)
    else:
        groups = {0: ordered}
    tuning, validation = [], []
    for label in sorted(groups):
        members = groups[label]
        n_tuning = min(len(members), max(1, share_count(len(members), fraction, per_class)))
        n_validation = 0
        if validation_fraction:
            n_validation = min(len(members) - n_tuning, share_count(len(members), validation_fraction, per_class))
        tuning += members[:n_tuning]
        validation += members[n_tuning:n_tuning + n_validation]
    return sorted(tuning, key=lambda r: order_key(seed, r)), sorted(validation, key=lambda r: order_key(seed, r))


# --------------------------------------------------------------------------------------------- models
class LinearProbe(nn.Module):
    """A linear classifier on the frozen model's SPE features (input head output)."""

    def __init__(self, base: nn.Module, num_labels: int):
        super().__init__()
        self.base = base
        for parameter in self.base.parameters():
            parameter.requires_grad = False
        self.classifier = nn.Linear(base.config.hidden_size, num_labels)

    def forward(self, labels=None, task_family=None, num_items_in_batch=None, **inputs):
        inputs = {k: v for k, v in inputs.items() if not k.startswith("target_")}
        with torch.no_grad():
            out = self.base.uniperceiver(**{k: v for k, v in inputs.items() if k != "query_positions"})
            features = self.base.input_head(self.base.gather_queries(out, inputs.get("query_positions"), False, 0)[0])
        if features.dim() == 3:
            features = features[:, 0]
        logits = self.classifier(features)
        loss = None if labels is None else F.cross_entropy(logits, labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def build_tuned_model(base, method: str, family: str, num_labels: int | None, num_prompts: int,
                      prompt_gate: bool = False):
    if method == "prompt":
        from peft import get_peft_model

        from .adapter import DeepPromptConfig

        config = DeepPromptConfig(num_prompts=num_prompts, num_labels=num_labels if family in CLASSIFICATION else None,
                                  separate_target_prompts=family == "retrieval", prompt_gate=prompt_gate)
        return get_peft_model(base, config)
    if method == "linear_probe":
        if family not in CLASSIFICATION:
            raise ValueError(f"linear_probe is for classification tasks, not {family}")
        return LinearProbe(base, num_labels)
    if method == "full":
        for parameter in base.parameters():
            parameter.requires_grad = True
        return base
    raise ValueError(f"unknown method {method!r}; choose prompt, linear_probe or full")


# --------------------------------------------------------------------------------------------- data
class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


@dataclass
class Collator:
    """Raw rows -> model kwargs + labels through the task registry's builder, every tensor dense."""

    task: object
    ctx: object

    def __call__(self, rows):
        from training.tasks import build_batch

        batch = build_batch(self.task, rows, self.ctx, epoch=0)
        if batch.skipped:
            raise ValueError(f"task {self.task.name!r}: malformed samples {batch.skipped}")
        # dense tensors: the registry gives repeated route rows as broadcast views (`expand`), which the
        # DataLoader cannot pin for a GPU (page-locking needs one element per memory location)
        dense = {key: value.contiguous() if torch.is_tensor(value) else value for key, value in batch.inputs.items()}
        out = dict(dense, labels=batch.labels, task_family=self.task.family)
        if self.task.family == "retrieval":
            out["symmetric_loss"] = True
        return out


# --------------------------------------------------------------------------------------------- evaluation
class HeldOutTrainer(Trainer):
    """`transformers.Trainer` whose evaluations leave torch's random generators as they found them: an
    evaluation's data loader draws a seed from them, and training draws the routers' gate noise from them,
    so without this, evaluating the validation or held-out loss would change the tuning it watches."""

    def evaluate(self, *args, **kwargs):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)


class KeepBestOnValidation(TrainerCallback):
    """Model selection on the validation rows. At each evaluation of the validation set (the Trainer's,
    which reports `eval_validation_loss`), `score()` measures the model's validation metric (higher is
    better); a copy of the trainable parameters is kept when it is the highest so far (the earliest on a
    tie); training stops once `patience` evaluations in a row after step `patience_from` (the warmup, while
    the learning rate still rises) bring no higher score (0: never); at the end of training the kept
    parameters are written back, so the tuned model is the one of the best step. The evaluation before the
    first step is a candidate only with `start_is_candidate` (when the model then is the pre-trained one:
    a gated adapter, full fine-tuning); freshly drawn prompts or a random probe are not a tuning result.

    Not the Trainer's `load_best_model_at_end` with `EarlyStoppingCallback`: they choose among saved
    checkpoints only (so never the evaluation before the first step) and by a metric of the evaluation
    loop, where CIDEr-D needs captions generated by beam search; the copy kept here is the few trainable
    parameters, in memory.

    `history` holds (step, score) of every evaluation; `best_step` the step kept."""

    def __init__(self, model: nn.Module, score, patience: int = 0, patience_from: int = 0,
                 start_is_candidate: bool = True):
        self.model, self.score, self.patience, self.patience_from = model, score, patience, patience_from
        self.start_is_candidate = start_is_candidate
        self.history: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_score = -math.inf
        self.best_state: dict[str, torch.Tensor] = {}
        self.since_best = 0

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_validation_loss" not in metrics:
            return
        training = self.model.training
        value = float(self.score())
        self.model.train(training)
        self.history.append((state.global_step, value))
        if state.global_step == 0 and not self.start_is_candidate:
            return
        if value > self.best_score:
            self.best_step, self.best_score, self.since_best = state.global_step, value, 0
            self.best_state = {name: p.detach().to("cpu", copy=True) for name, p in self.trainable().items()}
        elif state.global_step > self.patience_from:
            self.since_best += 1
            if self.patience and self.since_best >= self.patience:
                control.should_training_stop = True

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        for name, parameter in self.trainable().items():
            if name in self.best_state:
                parameter.copy_(self.best_state[name])


@torch.no_grad()
def downstream_metrics(model, task, rows: list[dict], ctx, device, beam_size: int = 2, batch_size: int = 32) -> dict:
    """Held-out metrics through the offline `evaluate` modules. The model runs through pre-training's
    evaluation loops (`training.evaluation`: candidate logits, retrieval similarities); captioning generates
    with beam search and is scored by BLEU-4 and CIDEr-D."""
    from training.evaluation import caption_generation_scores, candidate_answers, retrieval_scores

    from .metrics import load_metric

    model.eval()
    if task.family in CLASSIFICATION:
        metric = load_metric("accuracy")
        for logits, labels in candidate_answers(model, task, rows, ctx, device, batch_size):
            metric.add_batch(predictions=logits.argmax(-1).tolist(), references=labels.tolist())
        return metric.compute()
    if task.family == "retrieval":
        scores = retrieval_scores(model, task, rows, ctx, device, batch_size)
        return load_metric("retrieval_recall").compute(predictions=scores.cpu().tolist(),
                                                       references=list(range(scores.shape[0])))
    if task.family == "captioning":
        return caption_generation_scores(model, task, rows, ctx, device, beam_size, batch_size)
    raise ValueError(f"no downstream evaluation for family {task.family!r}")


def selection_metric(family: str) -> str:
    """The validation metric that chooses the tuned step (higher is better): accuracy for classification,
    CIDEr-D of the generated captions for captioning, the mean R@1 of both directions for retrieval."""
    if family in CLASSIFICATION:
        return "accuracy"
    return {"captioning": "cider", "retrieval": "mean_R@1"}[family]


def selection_score(family: str, metrics: dict) -> float:
    """`selection_metric(family)` of `downstream_metrics`' result."""
    name = selection_metric(family)
    if name == "mean_R@1":
        return (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    return metrics[name]


def headline(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(v, float)}


def plot_tuning_curve(results: dict, path: str) -> bool:
    """Training loss (at each logging step), validation loss and, when measured, held-out loss (at each
    evaluation) against the step, the validation metric on a second axis; the frozen model's held-out loss
    as a dashed line and the chosen step as a dotted one. False when matplotlib is missing."""
    from training.report import offscreen_pyplot

    plt = offscreen_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(results["train_loss_steps"], results["train_loss"], label="training loss (tuning rows)")
    for key, label in (("validation_loss", "validation loss"), ("held_out_loss", "held-out loss")):
        if results.get(key):
            steps, losses = zip(*results[key])
            ax.plot(steps, losses, "o-", label=label)
    if "zero_shot_held_out_loss" in results:
        ax.axhline(results["zero_shot_held_out_loss"], color="grey", linestyle="--", linewidth=1,
                   label="held-out loss, frozen model (adapter off)")
    handles, labels = ax.get_legend_handles_labels()
    if results.get("validation_score"):
        right = ax.twinx()
        steps, scores = zip(*results["validation_score"])
        right.plot(steps, scores, "s--", color="tab:purple",
                   label=f"validation {results['validation_metric']} (chooses the step)")
        right.set_ylabel(f"validation {results['validation_metric']}")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if results.get("selected_step") is not None:
        handles.append(ax.axvline(results["selected_step"], color="black", linestyle=":", linewidth=1))
        labels.append(f"chosen step ({results['selected_step']})")
    ax.set(xlabel="optimizer step", ylabel="loss",
           title=f"{results['task']}, {results['method']}, {results['train_samples']} tuning rows")
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- main
@dataclass
class PromptTuningArguments:
    """The script's options (`modeling_uniperceiver_moe.command_line`): flags `--data_fraction 0.01` (also
    spelled `--data-fraction`), or a single `.yaml` / `.json` file holding them."""

    model: str = field(metadata={"help": "a pre-trained checkpoint folder (training/ writes final/)"})
    task: str = field(metadata={"help": "a registered task (training/tasks.py)"})
    data_fraction: float = field(default=0.01, metadata={"help": "share of the training rows to tune on"})
    method: str = field(default="prompt", metadata={"choices": ["prompt", "linear_probe", "full"],
                                                    "help": "what is learned"})
    output_dir: Optional[str] = field(default=None, metadata={"help": "default: outputs/prompt-tuning/<task>-<method>"})
    data_cache: str = field(default="data_cache", metadata={"help": "where the data slices live"})
    slice: str = field(default="small", metadata={"help": "the data slice (training.build_data)"})
    num_prompts: int = field(default=10, metadata={"help": "deep prompts per layer"})
    prompt_gate: bool = field(default=False, metadata={
        "help": "gate the prompts' effect by a zero-initialised scale per layer, so the adapter starts as the "
                "frozen model (DeepPromptConfig.prompt_gate)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "default: the reference recipe of the family"})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "default: the reference recipe"})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "default: the reference recipe"})
    batch_size: int = field(default=32, metadata={"help": "training batch (capped at the number of rows)"})
    eval_samples: int = field(default=256, metadata={"help": "held-out rows (the first ones of the test split)"})
    beam_size: int = field(default=2, metadata={"help": "beam search width for captioning"})
    vocabulary_size: int = field(default=1024, metadata={
        "help": "candidate words of captioning: the end token and the slice's most frequent tokens"})
    seed: int = field(default=0, metadata={"help": "sampling of the rows and initialisation"})
    no_zero_shot: bool = field(default=False, metadata={"help": "skip the evaluation before tuning"})
    validation_fraction: float = field(default=0.01, metadata={
        "help": "share of the training split, disjoint from the tuning rows and drawn by the same rule, whose "
                "task metric (accuracy, CIDEr-D, mean R@1) chooses the tuned model: the best over the evaluations "
                "(from before the first step); 0: no validation, the schedule's last step"})
    eval_steps: Optional[int] = field(default=None, metadata={
        "help": "evaluate every N steps and before the first (default: a twentieth of the schedule)"})
    early_stopping_patience: int = field(default=5, metadata={
        "help": "stop once this many evaluations in a row after the warmup bring no better validation metric (0: "
                "run the whole schedule)"})
    held_out_curve: bool = field(default=False, metadata={
        "help": "at every evaluation also the loss on the held-out rows: written to results.json (held_out_loss) "
                "and plotted beside the training and validation losses in tuning_curve.png; it changes nothing"})


def parse_args(argv=None) -> PromptTuningArguments:
    from modeling_uniperceiver_moe.command_line import parse_script_arguments

    return parse_script_arguments(PromptTuningArguments, argv, prog="python -m prompt_tuning.run_prompt_tuning",
                                  description=__doc__)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.eval_steps is not None and args.eval_steps < 1:
        raise SystemExit(f"error: --eval_steps must be a positive number of steps, got {args.eval_steps}")
    if args.early_stopping_patience < 0:
        raise SystemExit(f"error: --early_stopping_patience must be 0 (off) or a number of evaluations, "
                         f"got {args.early_stopping_patience}")
    if not 0 <= args.validation_fraction < 1:
        raise SystemExit(f"error: --validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if args.eval_steps is not None and not args.validation_fraction and not args.held_out_curve:
        raise SystemExit("error: --eval_steps sets when the validation rows or the held-out curve are evaluated, "
                         "and --validation_fraction 0 without --held_out_curve evaluates neither")
    from transformers import TrainingArguments, set_seed

    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from modeling_uniperceiver_moe.processing_uniperceiver_moe import checkpoint_processor
    from training.build_data import MANIFEST, build_slice
    from training.data import read_split
    from training.data_sources import SOURCES
    from training.tasks import TaskContext, frequent_candidates, get_task, stored_token_id_tasks, task_label_names

    try:
        task = get_task(args.task)
    except KeyError as error:
        raise SystemExit(f"error: {error.args[0]}") from None
    family = task.family
    if family == "mlm":
        raise SystemExit("error: MLM is a pre-training task; choose a downstream task (classification, captioning, retrieval)")
    if task.source not in SOURCES:
        raise SystemExit(f"error: task {args.task!r} reads {task.source!r} rows, which no data slice bundles; "
                         f"prompt tuning runs on the bundled tasks")
    output_dir = args.output_dir or os.path.join("outputs", "prompt-tuning", f"{args.task}-{args.method}")
    set_seed(args.seed)
    try:
        base = UniPerceiverMoEForGenericPerception.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load the model from {args.model!r}: {error}") from None
    data_dir = build_slice(args.slice, args.data_cache, [task.source], progress=True)
    manifest = json.load(open(os.path.join(data_dir, MANIFEST)))
    label_names = task_label_names(task, manifest["sources"])
    processor = checkpoint_processor(args.model, base.config.image_size, base.config.bos_token_id is not None)
    try:
        vocabulary = frequent_candidates(manifest["vocabulary"], args.vocabulary_size, base.config.eos_token_id)
    except ValueError as error:
        raise SystemExit(f"error: --vocabulary_size {args.vocabulary_size}: {error}") from None
    ctx = TaskContext(processor.tokenizer, processor.image_processor, base.config,
                      label_names={task.name: label_names} if label_names else {},
                      vocabulary=vocabulary, seed=args.seed,
                      token_id_tasks=stored_token_id_tasks([task.name], manifest, processor.tokenizer))
    train_rows, validation_rows = split_tuning_rows(
        read_split(data_dir, manifest, task.source, "train"), args.data_fraction, args.validation_fraction,
        per_class=family in CLASSIFICATION, seed=args.seed)
    if args.validation_fraction and not validation_rows:
        raise SystemExit(f"error: --validation_fraction {args.validation_fraction}: no training rows are left for "
                         f"validation after the {len(train_rows)} tuning rows; lower --data_fraction or pass "
                         f"--validation_fraction 0")
    eval_rows = read_split(data_dir, manifest, task.source, "test", args.eval_samples)
    steps, lr, warmup = RECIPES[family]
    steps = args.max_steps or steps
    evaluating = bool(validation_rows) or args.held_out_curve
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else min(warmup, steps // 5)
    eval_steps = args.eval_steps or max(1, steps // 20)
    eval_datasets = {}
    if validation_rows:
        eval_datasets["validation"] = Rows(validation_rows)
    if args.held_out_curve:
        eval_datasets["held_out"] = Rows(eval_rows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    results = {"task": args.task, "method": args.method, "train_samples": len(train_rows),
               "validation_samples": len(validation_rows), "eval_samples": len(eval_rows),
               "data_fraction": args.data_fraction, "validation_fraction": args.validation_fraction}
    num_labels = len(label_names) if label_names else None
    model = build_tuned_model(base, args.method, family, num_labels, args.num_prompts, args.prompt_gate).to(device)
    if args.prompt_gate:
        results["prompt_gate"] = True
    if not args.no_zero_shot and args.method != "linear_probe":
        # zero-shot = the pre-trained model as it is (the adapter switched off: its random prompts would
        # otherwise perturb the baseline)
        if args.method == "prompt":
            with model.disable_adapter():
                results["before"] = downstream_metrics(model, task, eval_rows, ctx, device, args.beam_size)
        else:
            results["before"] = downstream_metrics(model, task, eval_rows, ctx, device, args.beam_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results["trainable_parameters"] = trainable
    results["total_parameters"] = sum(p.numel() for p in model.parameters())
    if hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, learning_rate=args.learning_rate or lr,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=0.1,
        per_device_train_batch_size=min(args.batch_size, len(train_rows)), logging_steps=max(1, steps // 20),
        save_strategy="no", report_to="none", remove_unused_columns=False, seed=args.seed,
        dataloader_num_workers=0, use_cpu=device.type == "cpu", disable_tqdm=False,
        eval_strategy="steps" if evaluating else "no", eval_steps=eval_steps if evaluating else None,
        eval_on_start=evaluating, per_device_eval_batch_size=args.batch_size,
    )
    selection = None
    if validation_rows:
        def validation_score() -> float:
            return selection_score(family, downstream_metrics(model, task, validation_rows, ctx, device, args.beam_size))

        selection = KeepBestOnValidation(model, validation_score, patience=args.early_stopping_patience,
                                         patience_from=warmup_steps,
                                         start_is_candidate=args.method == "full" or args.prompt_gate)
    trainer = HeldOutTrainer(model=model, args=training_args, train_dataset=Rows(train_rows),
                             eval_dataset=eval_datasets or None, data_collator=Collator(task, ctx),
                             callbacks=[selection] if selection else None)
    if args.held_out_curve and args.method == "prompt":
        with model.disable_adapter():
            results["zero_shot_held_out_loss"] = trainer.evaluate(Rows(eval_rows), metric_key_prefix="eval_held_out")[
                "eval_held_out_loss"]
    results["train_seconds"] = trainer.train().metrics["train_runtime"]
    results["steps_trained"] = trainer.state.global_step
    if selection:
        results["validation_metric"] = selection_metric(family)
        results["validation_score"] = [list(point) for point in selection.history]
        results["selected_step"] = selection.best_step
    results["after"] = downstream_metrics(model, task, eval_rows, ctx, device, args.beam_size)
    results["train_loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    results["train_loss_steps"] = [h["step"] for h in trainer.state.log_history if "loss" in h]
    for name in ("validation", "held_out"):
        if name in eval_datasets:
            results[f"{name}_loss"] = [[h["step"], h[f"eval_{name}_loss"]] for h in trainer.state.log_history
                                       if f"eval_{name}_loss" in h]

    os.makedirs(output_dir, exist_ok=True)
    if args.method == "prompt":
        model.save_pretrained(os.path.join(output_dir, "adapter"))
    elif args.method == "linear_probe":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()},
                  os.path.join(output_dir, "linear_probe.safetensors"))
    else:
        model.save_pretrained(os.path.join(output_dir, "model"))
    processor.save_pretrained(os.path.join(output_dir, "processor"))
    if evaluating:
        plot_tuning_curve(results, os.path.join(output_dir, "tuning_curve.png"))
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    print(json.dumps({"task": args.task, "method": args.method, "train_samples": len(train_rows),
                      "trainable_parameters": trainable, "before": headline(results.get("before", {})),
                      "after": headline(results["after"])}, indent=1))
    return results


if __name__ == "__main__":
    main()
