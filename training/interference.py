"""Task interference of a trained model, measured on the directions of per-sample gradients.

    python -m training.interference --model outputs/pretrain-tiny/final \\
        --tasks fashion_mnist_classification,austen_mlm,emoji_captioning --samples 32 --out outputs/interference

For tasks i and j and a shared weight W (by default the second FFN projection, fc2, of the layers at one,
two and three thirds of the depth: layers 4, 8 and 12 of a 12-layer model, as the paper measures):

    D_j(x_i) = mean over samples x_j of  g_i(x_i) . g_j(x_j) / |g_j(x_j)|     (x_j != x_i when j = i)
    I[i, j]  = mean over samples x_i of  D_j(x_i) / D_i(x_i)

where g_t(x) is the gradient of task t's loss on sample x with respect to W. D_j(x_i) is the first-order
decrease of task i's loss on x_i from a unit step along task j's gradient; I[i, j] near 1 means an update
for j helps i as much as an update for i itself, at or below 0 that it does not help or hurts. Each layer
gives a matrix; `matrix` is their mean. Where a sample's own decrease D_i(x_i) is near 0 the ratio is
large, so the paper's mean of ratios can be dominated by a few samples; `matrix_ratio_of_means` (mean D_j
over mean D_i) is given beside it.

In an MoE layer fc2 is the stack of its experts' weights `[E, out, in]`, and the gradient is taken with
respect to that whole stack: a sample's gradient is non-zero only on the experts its tokens were routed to
(weighted by their gates), so two tasks routed to different experts have orthogonal gradients there and
interfere little, which is the effect the routing is meant to have. The losses are the tasks' plain
candidate cross-entropies (no label smoothing, no router loss), with the model in eval mode (no dropout,
no router noise); retrieval scores each sample against the other samples' captions.

Samples that predict nothing (a caption none of whose words is a candidate) are left out. Writes
`interference.json` (tasks, samples used per task, layers, which weights are expert stacks, the per-layer
matrices and their mean) and a heat map `interference.png` into `--out`.

For an MoE model it also writes where each task's tokens go, from the same samples' input pass: per gate,
the share of the real tokens' gate weight that each expert receives (`expert_usage`), how evenly each
task spreads over the experts (`expert_entropy`: the entropy of those shares over log E, averaged over
the gates; 1 = all experts alike), and how much two tasks share experts (`expert_overlap[i][j]`: the sum
over experts of the smaller of the two tasks' shares, averaged over the gates; 1 = the same experts in the
same proportions, 0 = disjoint experts). Low overlap is how a routing keeps two tasks' gradients apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn import functional as F

from modeling_uniperceiver_moe.command_line import parse_script_arguments

from .evaluation import SavedModelTasksArguments, encoder_expert_shares, expert_entropy, expert_overlap, gate_names


# --------------------------------------------------------------------------------------------- the metric
def interference_matrix(gradients: list[torch.Tensor], reduce: str = "mean_of_ratios") -> torch.Tensor:
    """`I` `[T, T]` from per-sample gradients of T tasks (task t: `[n_t, P]`, one row per sample; every task
    at least 2 samples). Rows index the task whose loss changes (i), columns the task stepped along (j).
    reduce: "mean_of_ratios" (the paper's: the mean over x_i of D_j(x_i) / D_i(x_i)) or "ratio_of_means"
    (mean D_j / mean D_i: steadier where a sample's own decrease D_i(x_i) is near 0)."""
    if reduce not in ("mean_of_ratios", "ratio_of_means"):
        raise ValueError(f"reduce must be mean_of_ratios or ratio_of_means, got {reduce!r}")
    if any(g.dim() != 2 or g.shape[0] < 2 for g in gradients):
        raise ValueError("each task needs a [samples >= 2, parameters] gradient matrix")
    gradients = [g.double() for g in gradients]
    units = [F.normalize(g, dim=1) for g in gradients]
    matrix = torch.zeros(len(gradients), len(gradients), dtype=torch.float64)
    for i, g_i in enumerate(gradients):
        decrease = []  # D_j(x_i) for every j: [n_i] each
        for j, u_j in enumerate(units):
            dots = g_i @ u_j.t()  # [n_i, n_j]
            if i == j:  # leave the sample itself out
                dots = dots - torch.diag_embed(dots.diagonal())
                decrease.append(dots.sum(1) / (dots.shape[1] - 1))
            else:
                decrease.append(dots.mean(1))
        for j in range(len(gradients)):
            matrix[i, j] = ((decrease[j] / decrease[i]).mean() if reduce == "mean_of_ratios"
                            else decrease[j].mean() / decrease[i].mean())
    return matrix


def default_layers(num_layers: int) -> list[int]:
    """0-based indices of the layers at one, two and three thirds of the depth (3, 7, 11 of 12)."""
    return sorted({max(0, round(num_layers * k / 3) - 1) for k in (1, 2, 3)})


def shared_weights(model, layers: list[int]) -> dict[str, torch.nn.Parameter]:
    """The fc2 weight of each of `layers` (an MoE layer's: the experts' stacked weights)."""
    encoder_layers = model.base_model.encoder.layers
    if any(not 0 <= layer < len(encoder_layers) for layer in layers):
        raise ValueError(f"layers {layers} outside the model's 0..{len(encoder_layers) - 1}")
    return {f"layers.{layer}.mlp.fc2.weight": encoder_layers[layer].mlp.fc2.weight for layer in layers}


def per_sample_losses(batch, output) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B]` losses and `[B]` whether each sample predicts anything: each sample's mean candidate
    cross-entropy over its predictions (one for classification and retrieval, its masked or next words for
    MLM and captioning; a caption none of whose words is a candidate predicts nothing)."""
    if batch.task.family == "retrieval":  # image -> the batch's captions
        targets = torch.arange(output.logits.shape[0], device=output.logits.device)
        return F.cross_entropy(output.logits, targets, reduction="none"), torch.ones_like(targets, dtype=torch.bool)
    logits = output.logits.reshape(batch.labels.shape[0], -1, output.logits.shape[-1])
    labels = batch.labels.reshape(batch.labels.shape[0], -1).to(logits.device)
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [B, Q]
    counts = (labels != -100).sum(1)
    return losses.sum(1) / counts.clamp(min=1), counts > 0


def task_gradients(model, batch, weights: dict[str, torch.nn.Parameter], progress=None, expert_shares: bool = False):
    """Per-sample gradients `[S, numel]` of each weight, from one forward over the batch and one backward
    per sample; S counts the samples that predict something (`per_sample_losses`). With `expert_shares`
    (an MoE model) also the input pass's `evaluation.encoder_expert_shares` from that same forward:
    returns (gradients, shares `[G, E]`)."""
    output = model(**batch.inputs, task_family=batch.task.family, output_router_logits=expert_shares or None)
    losses, predicts = per_sample_losses(batch, output)
    kept = predicts.nonzero().flatten().tolist()
    rows = {name: [] for name in weights}
    for index in kept:
        grads = torch.autograd.grad(losses[index], list(weights.values()), retain_graph=index != kept[-1],
                                    allow_unused=True)
        for name, weight, grad in zip(weights, weights.values(), grads):
            rows[name].append((torch.zeros_like(weight) if grad is None else grad).reshape(-1).float().cpu())
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.update(len(losses) - len(kept))
    gradients = {name: torch.stack(values) if values else torch.zeros(0, weight.numel())
                 for (name, values), weight in zip(rows.items(), weights.values())}
    return (gradients, encoder_expert_shares(model, output.input_outputs)) if expert_shares else gradients


# --------------------------------------------------------------------------------------------- the command
@dataclass
class InterferenceArguments(SavedModelTasksArguments):
    samples: int = field(default=100, metadata={"help": "samples per task (the paper: 100)"})
    layers: Optional[str] = field(default=None, metadata={
        "help": "0-based layer indices, comma-separated (default: one, two and three thirds of the depth)"})
    split: str = field(default="train", metadata={"choices": ["train", "test"], "help": "rows of this split"})


def load_task_samples(args: InterferenceArguments, model, task_names: list[str]):
    """A `TaskContext` for the model and each task's first `args.samples` rows of `args.split`."""
    from .evaluation import task_context

    ctx, tasks, read = task_context(args.model, model.config, task_names, args.slice, args.data_cache,
                                    args.vocabulary_size, end_token_candidate=args.end_token_candidate)
    return ctx, tasks, {task.name: read(task, args.split, args.samples) for task in tasks}


def plot(matrices: dict[str, torch.Tensor], names: list[str], path: str, title: str) -> None:
    """One heat map per reduction, side by side, each value written in its cell."""
    from .report import offscreen_pyplot

    plt = offscreen_pyplot()
    if plt is None:
        raise ImportError("the heat map needs matplotlib: pip install matplotlib (or the [train] extra)")
    size = 1.5 + 0.8 * len(names)
    figure, panels = plt.subplots(1, len(matrices), figsize=(2 * size + 2, size + 1), squeeze=False)
    for axes, (reduce, matrix) in zip(panels[0], matrices.items()):
        # colours saturate at +-2 (the numbers in the cells do not): a few ratios with a small denominator
        # would otherwise wash out the rest
        image = axes.imshow(matrix.numpy(), cmap="RdBu", vmin=-2.0, vmax=2.0)
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(range(len(names)), names, fontsize=8)
        axes.set_xlabel("task j (the step's direction)")
        axes.set_ylabel("task i (the loss that changes)")
        for i in range(len(names)):
            for j in range(len(names)):
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
        figure.colorbar(image, ax=axes, label="I[i, j]", shrink=0.8, extend="both")
        axes.set_title(f"{reduce.replace('_', ' ')}", fontsize=10)
    figure.suptitle(f"interference, {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    from .evaluation import model_for_tasks
    from .tasks import build_batch

    args = parse_script_arguments(InterferenceArguments, argv, prog="python -m training.interference",
                                  description=__doc__)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise SystemExit(f"error: --tasks needs at least two different tasks, got {names}")
    if args.samples < 2:
        raise SystemExit("error: --samples must be >= 2 (a task's own direction leaves the sample itself out)")
    model = model_for_tasks(args.model, names)
    try:
        layers = (default_layers(model.config.num_hidden_layers) if args.layers is None
                  else [int(layer) for layer in args.layers.split(",")])
        weights = shared_weights(model, layers)
    except ValueError as error:
        raise SystemExit(f"error: --layers: {error}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    ctx, tasks, rows = load_task_samples(args, model, names)
    os.makedirs(args.out, exist_ok=True)

    gradients, counts, shares = {name: [] for name in weights}, {}, {}
    routed = model.config.moe_routing != "none"
    with tqdm(total=sum(len(r) for r in rows.values()), desc="per-sample gradients", unit="sample") as progress:
        for task in tasks:
            batch = build_batch(task, rows[task.name], ctx, epoch=0).to(device)
            per_weight = task_gradients(model, batch, weights, progress, expert_shares=routed)
            if routed:
                per_weight, shares[task.name] = per_weight
            counts[task.name] = len(next(iter(per_weight.values())))
            if counts[task.name] < 2:
                raise SystemExit(f"error: task {task.name!r} has {counts[task.name]} usable sample(s) among the "
                                 f"first {args.samples} of its {args.split} split; at least 2 are needed")
            for name in weights:
                gradients[name].append(per_weight[name])
    def listed(matrix: torch.Tensor) -> list[list[float]]:
        return [[round(float(value), 4) for value in row] for row in matrix]

    result = {"model": args.model, "tasks": names, "samples": counts, "split": args.split, "layers": layers,
              "weights": list(weights), "routing": model.config.moe_routing,
              "expert_stacks": [name for name, weight in weights.items() if weight.dim() == 3]}
    matrices = {}
    for reduce, key in (("mean_of_ratios", "matrix"), ("ratio_of_means", "matrix_ratio_of_means")):
        per_layer = {name: interference_matrix(values, reduce) for name, values in gradients.items()}
        matrices[reduce] = torch.stack(list(per_layer.values())).mean(0)
        result[key] = listed(matrices[reduce])
        result[f"per_layer_{reduce}"] = {name: listed(m) for name, m in per_layer.items()}
    if routed:
        result["expert_gates"] = gate_names(model)
        result["expert_usage"] = {name: listed(value) for name, value in shares.items()}
        result["expert_entropy"] = {name: round(expert_entropy(value), 4) for name, value in shares.items()}
        result["expert_overlap"] = listed(expert_overlap([shares[name] for name in names]))
    with open(os.path.join(args.out, "interference.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    plot(matrices, names, os.path.join(args.out, "interference.png"),
         f"{model.config.moe_routing} routing, fc2 of layers {layers}")
    print(f"wrote {os.path.join(args.out, 'interference.json')} and interference.png")
    return result


if __name__ == "__main__":
    main()
