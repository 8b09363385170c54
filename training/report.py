"""The run report: `report.json`, `report.md` and `loss_curves.png` in the output directory."""

from __future__ import annotations

import json
import os

from .evaluation import headline


def chance_level(trainer, name: str, metrics: dict) -> float:
    """What guessing scores on the headline metric (for the report's comparison column)."""
    task = trainer.tasks[name]
    if task.family == "retrieval":
        return 1.0 / max(1, metrics.get("evaluated", 1))
    if task.family in ("mlm", "captioning"):
        return 1.0 / len(trainer.ctx.vocabulary)
    return 1.0 / len(trainer.ctx.label_names[name])


def plot_losses(history: list[dict], path: str) -> bool:
    """Training loss per task against steps (moving average of the per-step losses)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    per_task: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        if "task" in row and "loss" in row:
            per_task.setdefault(row["task"], []).append((row["step"], row["loss"]))
    if not per_task:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for task, points in sorted(per_task.items()):
        steps = [s for s, _ in points]
        losses = [l for _, l in points]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, label=task)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("multi-task pre-training")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(trainer, results: dict) -> dict:
    out = trainer.config.output_dir
    rows = []
    for name, metrics in results.items():
        key, value = headline(trainer.tasks[name], metrics)
        rows.append({"task": name, "family": trainer.tasks[name].family, "metric": key, "value": value,
                     "chance": chance_level(trainer, name, metrics), "eval_loss": metrics["loss"],
                     "evaluated": metrics["evaluated"]})
    throughput = [h["tokens_per_second"] for h in trainer.history if "tokens_per_second" in h]
    report = {
        "steps": trainer.step,
        "processes": trainer.accelerator.num_processes,
        "device": str(trainer.accelerator.device),
        "mixed_precision": trainer.config.train.mixed_precision,
        "routing": trainer.model_config.moe_routing,
        "parameters": sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()),
        "data_slice": trainer.config.data.slice,
        "median_tokens_per_second": sorted(throughput)[len(throughput) // 2] if throughput else None,
        "skipped_samples": len(trainer.loader.skipped),
        "tasks": rows,
        "full_metrics": results,
    }
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    plotted = plot_losses(trainer.history, os.path.join(out, "loss_curves.png"))
    lines = [
        "# Pre-training report", "",
        f"{report['steps']} optimizer steps, {report['processes']} process(es) on {report['device']}, "
        f"routing `{report['routing']}`, {report['parameters']:,} parameters, data slice `{report['data_slice']}`, "
        f"median {report['median_tokens_per_second'] or 0:,.0f} tokens/s.", "",
        "| task | family | metric | value | chance | eval loss | evaluated |", "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['task']} | {row['family']} | {row['metric']} | {row['value']:.3f} | {row['chance']:.3f} "
                     f"| {row['eval_loss']:.3f} | {row['evaluated']} |")
    if plotted:
        lines += ["", "![loss curves](loss_curves.png)"]
    lines += ["", "The final model (`final/`) loads with `UniPerceiverMoEForGenericPerception.from_pretrained`."]
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return report
