"""Per-task evaluation on held-out rows (one process, no gradients, deterministic).

Metrics: classification accuracy (image, video, text); masked-token accuracy (MLM) and teacher-forced
next-word accuracy (captioning) over the candidate vocabulary; retrieval recall@1/5 in both directions
over the evaluated pool. Every task also reports its mean candidate cross-entropy (no label smoothing).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .tasks import Task, TaskContext, build_batch


def _chunks(rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def model_answers(model, task: Task):
    """The default `answers` of `candidate_answers`: the model's own candidate logits `[N, K]` and the labels
    `[N]` of a task batch (any model whose output has `"logits"`: this package's head, a PEFT wrapper of it,
    a linear probe)."""

    def answers(batch):
        logits = model(**batch.inputs, task_family=task.family)["logits"]
        return logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1)

    return answers


@torch.no_grad()
def candidate_answers(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64,
                      answers=None):
    """Yields, per batch of `rows` (raw rows of a test split), the float logits `[n, K]` over the batch's K
    candidates and the labels `[n]` of its n answers (positions without a label left out).

    answers: `(TaskBatch on device) -> (logits [N, K], labels [N])`; by default `model_answers(model, task)`.
    Another module scored on the same candidates (the plain baselines of `training.baselines`) passes its own."""
    answers = answers or model_answers(model, task)
    for part in _chunks(rows, batch_size):
        batch = build_batch(task, part, ctx, epoch=0).to(device)
        if batch.num_samples == 0:
            continue
        logits, labels = answers(batch)
        keep = labels != -100
        yield logits.float()[keep], labels[keep]


@torch.no_grad()
def retrieval_scores(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64
                     ) -> torch.Tensor:
    """`[N, N]` similarity of every evaluated image (rows) to every evaluated caption (columns); the caption
    of image i is column i."""
    images, texts = [], []
    for part in _chunks(rows, batch_size):
        batch = build_batch(task, part, ctx, epoch=0).to(device)
        if batch.num_samples == 0:
            continue
        out = model(**batch.inputs, task_family=task.family)
        images.append(out.input_features.float())
        texts.append(out.target_features.float())
    return torch.cat(images) @ torch.cat(texts).t()


def recall_at_k(scores: torch.Tensor, truth: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """scores `[Q, C]` of Q queries over C candidates, truth `[Q]` the index of each query's right candidate ->
    {k: the share of queries whose right candidate ranks in the top k}. A candidate that scores as high as
    the right one counts as ranked above it, so collapsed (constant) scores give chance-level recall, not a
    perfect one."""
    rank = (scores >= scores.gather(1, truth[:, None])).sum(1) - 1
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate_task(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64,
                  autocast_dtype=None, answers=None) -> dict:
    """Metrics of one task on `rows` (raw rows of its test split). `model` is the unwrapped model; `answers`
    as in `candidate_answers`."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            if task.family == "retrieval":
                return _evaluate_retrieval(model, task, rows, ctx, device, batch_size)
            correct = total = 0
            loss_sum = 0.0
            predicted = set()
            for logits, labels in candidate_answers(model, task, rows, ctx, device, batch_size, answers):
                guesses = logits.argmax(-1)
                predicted.update(guesses.tolist())
                correct += int((guesses == labels).sum())
                total += len(labels)
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            key = "accuracy" if "classification" in task.family else "token_accuracy"
            return {key: correct / max(total, 1), "loss": loss_sum / max(total, 1), "evaluated": total,
                    "distinct_predictions": len(predicted)}
    finally:
        model.train(was_training)


def _evaluate_retrieval(model, task, rows, ctx, device, batch_size) -> dict:
    similarity = retrieval_scores(model, task, rows, ctx, device, batch_size)
    truth = torch.arange(len(similarity), device=similarity.device)
    metrics = {"evaluated": len(similarity)}
    for name, scores in (("i2t", similarity), ("t2i", similarity.t())):
        metrics.update({f"{name}_R@{k}": value for k, value in recall_at_k(scores, truth, (1, 5)).items()})
    metrics["distinct_predictions"] = len(set(similarity.argmax(1).tolist()))  # distinct top-1 texts (i2t)
    metrics["loss"] = float(F.cross_entropy(similarity * model.logit_scales(task.family).float(), truth))
    return metrics


def evaluate_all(model, tasks: dict[str, Task], eval_rows: dict[str, list[dict]], ctx: TaskContext, device,
                 autocast_dtype=None) -> dict[str, dict]:
    return {name: evaluate_task(model, task, eval_rows[name], ctx, device, autocast_dtype=autocast_dtype)
            for name, task in tasks.items() if eval_rows.get(name)}


def trivial_baseline(task: Task, train_counts: torch.Tensor | None, eval_rows: list[dict], ctx: TaskContext,
                     batch_size: int = 256) -> dict:
    """What a model that ignores its input scores on the headline metric of `task`.

    Classification, MLM and captioning: always answer the candidate that is most frequent among the
    training answers (`train_counts` `[K]`, from `answer_counts`: majority class; most frequent masked or
    next word); its score is that candidate's share of the evaluated answers. Retrieval (`train_counts`
    unused): chance recall@1, 1 / the evaluated pool. Returns `{"metric", "value", "answer"}` (answer: the
    candidate index, None for retrieval).
    """
    if task.family == "retrieval":
        pool = sum(build_batch(task, part, ctx, epoch=0).num_samples for part in _chunks(eval_rows, batch_size))
        return {"metric": "i2t_R@1", "value": 1.0 / max(pool, 1), "answer": None}
    answer = int(train_counts.argmax())
    evaluated = answer_counts(task, eval_rows, ctx, batch_size)
    hits = int(evaluated[answer])
    metric = "accuracy" if "classification" in task.family else "token_accuracy"
    return {"metric": metric, "value": hits / max(int(evaluated.sum()), 1), "answer": answer}


def answer_counts(task: Task, rows: list[dict], ctx: TaskContext, batch_size: int = 256) -> torch.Tensor:
    """`[K]` how often each candidate of `task` (class, or vocabulary word for MLM and captioning) is the right
    answer in `rows` (raw rows; as the batch builders label them, evaluation's hiding for MLM)."""
    num_candidates = len(ctx.vocabulary) if task.family in ("mlm", "captioning") else len(ctx.label_names[task.name])
    counts = torch.zeros(num_candidates, dtype=torch.long)
    for part in _chunks(rows, batch_size):
        labels = build_batch(task, part, ctx, epoch=0).labels.reshape(-1)
        counts += torch.bincount(labels[labels != -100], minlength=num_candidates)
    return counts


def headline(task: Task, metrics: dict) -> tuple[str, float]:
    """The one number a report shows per task."""
    if task.family == "retrieval":
        return "i2t_R@1", metrics["i2t_R@1"]
    key = "accuracy" if "accuracy" in metrics else "token_accuracy"
    return key, metrics[key]
