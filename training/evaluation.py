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


@torch.no_grad()
def evaluate_task(model, task: Task, rows: list[dict], ctx: TaskContext, device, batch_size: int = 64,
                  autocast_dtype=None) -> dict:
    """Metrics of one task on `rows` (raw rows of its test split). `model` is the unwrapped model."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            if task.family == "retrieval":
                return _evaluate_retrieval(model, task, rows, ctx, device, batch_size)
            correct = total = 0
            loss_sum = 0.0
            for part in _chunks(rows, batch_size):
                batch = build_batch(task, part, ctx, epoch=0).to(device)
                if batch.num_samples == 0:
                    continue
                out = model(**batch.inputs, task_family=task.family)
                logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
                labels = batch.labels.reshape(-1)
                keep = labels != -100
                correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
                total += int(keep.sum())
                loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            key = "accuracy" if "classification" in task.family else "token_accuracy"
            return {key: correct / max(total, 1), "loss": loss_sum / max(total, 1), "evaluated": total}
    finally:
        model.train(was_training)


def _evaluate_retrieval(model, task, rows, ctx, device, batch_size) -> dict:
    images, texts = [], []
    for part in _chunks(rows, batch_size):
        batch = build_batch(task, part, ctx, epoch=0).to(device)
        if batch.num_samples == 0:
            continue
        out = model(**batch.inputs, task_family=task.family)
        images.append(out.input_features.float())
        texts.append(out.target_features.float())
    images, texts = torch.cat(images), torch.cat(texts)
    similarity = images @ texts.t()
    truth = torch.arange(len(images), device=similarity.device)
    metrics = {"evaluated": len(images)}
    for name, scores in (("i2t", similarity), ("t2i", similarity.t())):
        # how many other candidates score at least as high as the true one (ties count against us, so
        # collapsed features give chance-level recall, not a perfect one)
        rank = (scores >= scores.gather(1, truth[:, None])).sum(1) - 1
        for k in (1, 5):
            metrics[f"{name}_R@{k}"] = float((rank < k).float().mean())
    metrics["loss"] = float(F.cross_entropy(similarity * model.logit_scales(task.family).float(), truth))
    return metrics


def evaluate_all(model, tasks: dict[str, Task], eval_rows: dict[str, list[dict]], ctx: TaskContext, device,
                 autocast_dtype=None) -> dict[str, dict]:
    return {name: evaluate_task(model, task, eval_rows[name], ctx, device, autocast_dtype=autocast_dtype)
            for name, task in tasks.items() if eval_rows.get(name)}


def headline(task: Task, metrics: dict) -> tuple[str, float]:
    """The one number a report shows per task."""
    if task.family == "retrieval":
        return "i2t_R@1", metrics["i2t_R@1"]
    key = "accuracy" if "accuracy" in metrics else "token_accuracy"
    return key, metrics[key]
