"""The run report: `report.json`, `report.md` and `loss_curves.png` in the output directory."""

from __future__ import annotations

import json
import os

import torch

from .evaluation import headline


def chance_level(trainer, name: str, metrics: dict) -> float:
    """What guessing scores on the headline metric (for the report's comparison column)."""
    task = trainer.tasks[name]
    if task.family == "retrieval":
        return 1.0 / max(1, metrics.get("evaluated", 1))
    if task.family in ("mlm", "captioning"):
        return 1.0 / len(trainer.ctx.vocabulary)
    return 1.0 / len(trainer.ctx.label_names[name])


def held_out_curves(history: list[dict], tasks: dict) -> dict[str, list[tuple[int, float]]]:
    """Per task, (step, headline metric) of every evaluation logged in `history` (`eval/<task>/<metric>` keys)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for name, task in tasks.items():
            prefix = f"eval/{name}/"
            metrics = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
            if metrics:
                curves.setdefault(name, []).append((row["step"], headline(task, metrics)[1]))
    return curves


def offscreen_pyplot():
    """`matplotlib.pyplot` drawing off screen (the Agg backend), or None when matplotlib is not installed: every
    plot of a run or a script goes through this, and is skipped without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(history: list[dict], tasks: dict, baselines: dict, path: str) -> bool:
    """Two panels: training loss per task (moving average of the per-step losses) and each task's held-out
    headline metric at every evaluation, with its trivial baseline as a dashed line of the same colour.
    The legend sits outside the axes so that it hides no curve."""
    plt = offscreen_pyplot()
    if plt is None:
        return False
    per_task: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        if "task" in row and "loss" in row:
            per_task.setdefault(row["task"], []).append((row["step"], row["loss"]))
    held_out = held_out_curves(history, tasks)
    if not per_task:
        return False
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted(tasks))}
    for task, points in sorted(per_task.items()):
        steps, losses = zip(*points)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        loss_ax.plot(steps, smooth, color=colours[task], label=task)
    loss_ax.set(xlabel="optimizer step", ylabel="training loss (moving average)", title="training loss")
    for task, points in sorted(held_out.items()):
        steps, values = zip(*points)
        metric_ax.plot(steps, values, "o-", color=colours[task])
        if task in baselines:
            metric_ax.axhline(baselines[task]["value"], color=colours[task], linestyle="--", linewidth=1)
    metric_ax.set(xlabel="optimizer step", ylabel="held-out accuracy (retrieval: i2t R@1)",
                  title="held-out metric (dashed: trivial baseline)", ylim=(0, 1))
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.84, 0.5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: the most the CUDA caching allocator held for tensors on a GPU, the
    peak resident set of the process (Linux: `ru_maxrss` in KiB) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_report(trainer, results: dict) -> dict:
    out = trainer.config.output_dir
    baselines = getattr(trainer, "baselines", {})
    rows = []
    for name, metrics in results.items():
        key, value = headline(trainer.tasks[name], metrics)
        rows.append({"task": name, "family": trainer.tasks[name].family, "metric": key, "value": value,
                     "trivial_baseline": baselines[name]["value"], "chance": chance_level(trainer, name, metrics),
                     "distinct_predictions": metrics["distinct_predictions"], "eval_loss": metrics["loss"],
                     "evaluated": metrics["evaluated"]})
        if "word_accuracy" in metrics:  # captioning with the end token among its answers
            rows[-1].update(word_accuracy=metrics["word_accuracy"],
                            word_trivial_baseline=baselines[name]["word_value"])
    throughput = [h["tokens_per_second"] for h in trainer.history if "tokens_per_second" in h]
    report = {
        "steps": trainer.step,
        "max_steps": trainer.config.train.max_steps,  # more than steps where train.max_minutes stopped it
        "processes": trainer.accelerator.num_processes,
        "device": str(trainer.accelerator.device),
        "mixed_precision": trainer.config.train.mixed_precision,
        "routing": trainer.model_config.moe_routing,
        "parameters": sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()),
        # what process 0 keeps of them (its shards under train.fsdp; all of them otherwise)
        "parameters_held": sum(getattr(p, "to_local", lambda: p)().numel() for p in trainer.model.parameters()),
        "fsdp": trainer.config.train.fsdp,
        # process 0's peak memory up to the end of the training steps (the final evaluation and save left out)
        "training_peak_memory_gib": getattr(trainer, "training_peak_memory_gib", None),
        "data_slice": trainer.config.data.slice,
        "median_tokens_per_second": sorted(throughput)[len(throughput) // 2] if throughput else None,
        "skipped_samples": len(trainer.loader.skipped),
        "tasks": rows,
        "full_metrics": results,
    }
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    plotted = plot_curves(trainer.history, trainer.tasks, baselines, os.path.join(out, "loss_curves.png"))
    lines = [
        "# Pre-training report", "",
        f"{report['steps']} of {report['max_steps']} optimizer steps, {report['processes']} process(es) on "
        f"{report['device']}, routing `{report['routing']}`, {report['parameters']:,} parameters, data slice "
        f"`{report['data_slice']}`, median {report['median_tokens_per_second'] or 0:,.0f} tokens/s.", "",
        "Trivial baseline: always the answer most frequent in training (majority class, most frequent masked or "
        "next word); retrieval: chance recall@1. Distinct: how many different answers the model gave.", "",
        "| task | family | metric | value | trivial baseline | chance | distinct | eval loss | evaluated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['task']} | {row['family']} | {row['metric']} | {row['value']:.3f} "
                     f"| {row['trivial_baseline']:.3f} | {row['chance']:.3f} | {row['distinct_predictions']} "
                     f"| {row['eval_loss']:.3f} | {row['evaluated']} |")
    words = [row for row in rows if "word_accuracy" in row]
    if words:
        lines += ["", "Captioning's answers include the end of each caption; on the other answers alone (the words):", ""]
        lines += [f"- {row['task']}: word accuracy {row['word_accuracy']:.3f}, the most frequent word "
                  f"{row['word_trivial_baseline']:.3f}" for row in words]
    if plotted:
        lines += ["", "![loss curves](loss_curves.png)"]
    lines += ["", "The final model (`final/`) loads with `UniPerceiverMoEForGenericPerception.from_pretrained`."]
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return report
