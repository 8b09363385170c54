"""The routing ablation's tables and figures (docs/results.md, "The routing ablation"), rebuilt from the logs of
`benchmarks/routing_ablation.sh` that `benchmarks.sweep_summary --json` wrote, one per part.

    python -m benchmarks.ablation_report docs/logs/learning/routing_ablation_part*_h200.json \\
        --figures docs/logs/learning/routing_ablation_h200

Prints markdown: per task and metric each routing's mean over its seeds with the spread (min-max), beside the
single-task references (`single-<task>_s0`), and any other variant after the routings; the paper's targets
checked on those numbers (every routing >= dense on a majority of tasks, attribute >= dense within the spread
on every task, the single-task gap of dense and attribute, off-diagonal interference); the zero-shot runs
(`zeroshot-<routing>_s<seed>`) on the task left out; the downstream tunings (`tuned-<routing>_s0`); with
`--cost` the step times of `benchmarks.bench_moe --json` against dense beside the paper's. `--figures PREFIX`
also draws `PREFIX_curves.png` (each task's own training loss, without the routers' auxiliary losses, mean over
seeds, one line per routing; a routing whose logs hold those losses inside the loss is not drawn) and
`PREFIX_interference.png` (the seed-mean interference matrices of dense and attribute MoE, ratio of means).
A task's primary metric, which the targets compare, is
accuracy for classification, word accuracy for MLM, CIDEr-D for captioning (word accuracy when no beam-search
evaluation ran) and image-to-text recall@1 for retrieval, all higher-is-better.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from benchmarks.sweep_summary import HEADLINE, SEED_SUFFIX, by_variant
from modeling_uniperceiver_moe.command_line import parse_script_arguments
from training.tasks import get_task

ROUTINGS = ("none", "attribute", "token", "context", "modality", "task")
PRIMARY_FIRST = {"captioning": "cider"}  # a family's primary metric where it is not the headline (when measured)
PAPER_COST = {"none": "1.0x / 1.0x", "attribute": "1.4x / 1.0x", "token": "1.8x / 2.2x", "context": "2.2x / 2.6x",
              "modality": "1.4x / 1.0x", "task": "1.4x / 1.0x"}  # Zhu et al. 2022, as ../shared/docs records them
SHOWN = ("accuracy", "token_accuracy", "perplexity", "bleu4", "cider", "i2t_R@1", "t2i_R@1")


def load_runs(paths: list[str]) -> list[dict]:
    """Every run of the given sweep_summary logs, each name once (a later log wins). A run that stopped before
    its last step (train.max_minutes) is refused: its numbers are not comparable with the others'."""
    runs = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for run in json.load(handle)["runs"]:
                if run.get("max_steps") is not None and run["steps"] < run["max_steps"]:
                    raise SystemExit(f"{path}: run {run['run']} stopped at step {run['steps']} of "
                                     f"{run['max_steps']}; give its part's command again to finish it")
                runs[run["run"]] = run
    return [runs[name] for name in sorted(runs)]


def primary_series(task: str, available: set[str]) -> Optional[str]:
    """The `task/metric` key the targets compare for `task`: its family's `PRIMARY_FIRST` metric when measured,
    else the task's headline metric (`training.evaluation.headline`), when measured."""
    first = PRIMARY_FIRST.get(get_task(task).family)
    if first and f"{task}/{first}" in available:
        return f"{task}/{first}"
    headline = [key for key in available if key.split("/")[0] == task and key.split("/")[1] in HEADLINE]
    return headline[0] if headline else None


def seed_runs(runs: list[dict], variant: str) -> list[dict]:
    """The runs `<variant>_s<seed>`."""
    return [run for run in runs if SEED_SUFFIX.search(run["run"]) and SEED_SUFFIX.sub("", run["run"]) == variant]


class DenseComparison(NamedTuple):
    """A routing against dense on each task's primary metric."""
    compared: list[str]  # tasks both measured
    at_least: list[str]  # the routing's seed mean >= dense's
    below: list[str]  # beyond the seed spread: the routing's best seed below dense's worst
    above: list[str]  # beyond the seed spread: the routing's worst seed above dense's best


def compare_with_dense(variants: dict[str, dict], routing: str) -> DenseComparison:
    """`routing`'s seed means and spreads against dense's on every task both measured."""
    dense, mine = variants["none"]["held_out"], variants[routing]["held_out"]
    keys = {task: primary_series(task, set(dense) & set(mine)) for task in sorted({k.split("/")[0] for k in dense})}
    keys = {task: key for task, key in keys.items() if key}
    return DenseComparison(list(keys), [task for task, key in keys.items() if mine[key]["mean"] >= dense[key]["mean"]],
                           [task for task, key in keys.items() if mine[key]["max"] < dense[key]["min"]],
                           [task for task, key in keys.items() if mine[key]["min"] > dense[key]["max"]])


def single_task_references(runs: list[dict]) -> dict[str, dict[str, float]]:
    """`{task: {task/metric: last value}}` of each `single-<task>_s0` run, its own task's series only."""
    references = {}
    for run in runs:
        if run["run"].startswith("single-"):
            task = SEED_SUFFIX.sub("", run["run"][len("single-"):])
            curves = {**run.get("other_metrics", {}), **run["held_out"]}
            references[task] = {key: curve[max(curve, key=int)] for key, curve in curves.items()
                                if key.startswith(task + "/") and curve}
    return references


def cell(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    if len(entry["values"]) == 1:
        return f"{entry['mean']:.3f}"
    between = " to " if entry["min"] < 0 else "-"  # "-0.45 to -0.21", not "-0.45--0.21"
    return f"{entry['mean']:.3f} ({entry['min']:.3f}{between}{entry['max']:.3f})"


def shown_series(variants: dict[str, dict]) -> list[str]:
    keys = {key for entry in variants.values() for key in entry["held_out"]}
    order = {metric: i for i, metric in enumerate(SHOWN)}
    return sorted((key for key in keys if key.rsplit("/", 1)[-1] in order),
                  key=lambda key: (key.rsplit("/", 1)[0], order[key.rsplit("/", 1)[-1]]))


OTHER_PARTS = ("single-", "zeroshot-", "tuned-")  # run-name prefixes with tables of their own


def table_columns(variants: dict[str, dict]) -> list[str]:
    """The routings in `ROUTINGS` order, then any other variant (e.g. a routing with one option changed)."""
    others = sorted(v for v in variants if v not in ROUTINGS and not v.startswith(OTHER_PARTS))
    return [r for r in ROUTINGS if r in variants] + others


def routing_table(variants: dict[str, dict], runs: list[dict], references: dict[str, dict]) -> str:
    routings = table_columns(variants)
    header = ["task / metric", *(("dense" if r == "none" else r) + f" (n={len(variants[r]['seeds'])})"
                                 for r in routings)]
    if references:
        header.append("single-task (attribute, n=1)")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key in shown_series({r: variants[r] for r in routings}):
        task = key.rsplit("/", 1)[0]
        row = [key] + [cell(variants[r]["held_out"].get(key)) for r in routings]
        if references:
            value = references.get(task, {}).get(key)
            row.append("-" if value is None else f"{value:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    speeds = [variants[r]["median_steps_per_second"] for r in routings]
    lines.append("| training steps/s (median; the runs of a device call share its GPU, so see the cost table) | "
                 + " | ".join("-" if s is None else f"{s:.2f}" for s in speeds) + (" | - |" if references else " |"))
    for key, label in (("off_diagonal_ratio_of_means", "interference off the diagonal, ratio of means"),
                       ("off_diagonal_mean_of_ratios", "interference off the diagonal, mean of ratios"),
                       ("off_diagonal_expert_overlap", "tasks' expert overlap off the diagonal")):
        entries = [seed_spread(runs, r, key) for r in routings]
        if any(e is not None for e in entries):
            lines.append(f"| {label} | " + " | ".join(cell(e) for e in entries) + (" | - |" if references else " |"))
    used = [experts_in_use(runs, r) for r in routings]
    if any(used):
        lines.append(f"| experts given > {USED_SHARE:.0%} of a gate's weight by some task, per gate | " + " | ".join(
            f"{min(u)}-{max(u)} (mean {sum(u) / len(u):.1f})" if u else "-" for u in used)
            + (" | - |" if references else " |"))
    return "\n".join(lines)


USED_SHARE = 0.05


def experts_in_use(runs: list[dict], routing: str) -> list[int]:
    """Per gate of each seed's interference measurement, how many experts receive more than `USED_SHARE` of the
    gate weight of at least one measured task (`training.interference`'s `expert_usage`)."""
    counts = []
    for run in seed_runs(runs, routing):
        usage = run.get("interference", {}).get("expert_usage")
        if not usage:
            continue
        gates = len(next(iter(usage.values())))
        counts += [len({e for shares in usage.values() for e, share in enumerate(shares[g]) if share > USED_SHARE})
                   for g in range(gates)]
    return counts


def seed_spread(runs: list[dict], routing: str, key: str) -> Optional[dict]:
    """`{"values", "mean", "min", "max"}` of one interference summary over the seeds of `<routing>_s<seed>`."""
    values = [run["interference"][key] for run in seed_runs(runs, routing) if key in run.get("interference", {})]
    if not values:
        return None
    return {"values": values, "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def cost_table(bench: dict) -> str:
    """Training and inference step time of each routing against dense, from a `benchmarks.bench_moe --json` log."""
    rows = {(row["phase"], row["model"]): row for row in bench["rows"] if not row["compiled"]}
    routings = [r for r in ROUTINGS if ("train", r) in rows or ("infer", r) in rows]
    lines = ["| | " + " | ".join("dense" if r == "none" else r for r in routings) + " |",
             "|---" * (len(routings) + 1) + "|"]
    for phase, label in (("train", "training step time vs dense"), ("infer", "inference step time vs dense")):
        lines.append(f"| {label} | " + " | ".join(
            f"{rows[(phase, r)]['time_vs_dense']:.2f}x" if (phase, r) in rows else "-" for r in routings) + " |")
    lines.append("| the paper's (train / infer) | " + " | ".join(PAPER_COST[r] for r in routings) + " |")
    return "\n".join(lines)


def targets(variants: dict[str, dict], references: dict[str, dict]) -> list[str]:
    """The paper's claims, checked on the primary metric of every task both sides measured."""
    if "none" not in variants:
        return ["- no dense runs in these logs: nothing to compare against"]
    lines = []
    for routing in [r for r in ROUTINGS if r in variants and r != "none"]:
        compared, better, below, above = compare_with_dense(variants, routing)
        lines.append(f"- {routing} >= dense (seed means) on {len(better)} of {len(compared)} tasks"
                     + (f": {', '.join(better)}" if better else "") + "; beyond the seed spread, above dense on "
                     + (", ".join(above) if above else "no task") + ", below on "
                     + (", ".join(below) if below else "no task"))
    for routing in ("none", "attribute"):
        if routing not in variants or not references:
            continue
        gaps = []
        for task, reference in sorted(references.items()):
            key = primary_series(task, set(reference) & set(variants[routing]["held_out"]))
            if key:
                gaps.append((task, reference[key] - variants[routing]["held_out"][key]["mean"]))
        if gaps:
            mean = sum(g for _, g in gaps) / len(gaps)
            lines.append(f"- single-task gap (single-task minus multi-task, primary metric), "
                         f"{'dense' if routing == 'none' else routing}: mean {mean:+.3f} over {len(gaps)} tasks ("
                         + ", ".join(f"{task} {gap:+.3f}" for task, gap in gaps) + ")")
    return lines


def zero_shot_table(variants: dict[str, dict]) -> str:
    names = [f"zeroshot-{r}" for r in ("none", "attribute") if f"zeroshot-{r}" in variants]
    if not names:
        return ""
    lines = ["| task / metric | " + " | ".join(f"{n} (n={len(variants[n]['seeds'])})" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for key in shown_series({n: variants[n] for n in names}):
        lines.append(f"| {key} | " + " | ".join(cell(variants[n]["held_out"].get(key)) for n in names) + " |")
    return "\n".join(lines)


def tuning_table(runs: list[dict]) -> str:
    tuned = [run for run in runs if run["run"].startswith("tuned-") and run.get("tuning")]
    if not tuned:
        return ""
    lines = ["| model | task / method | metric | before | after | trainable parameters | train samples |",
             "|---|---|---|---|---|---|---|"]
    for run in tuned:
        for key, result in sorted(run["tuning"].items()):
            for metric, after in sorted(result["after"].items()):
                if metric in ("loss", "samples", "evaluated"):
                    continue
                before = result["before"].get(metric)
                lines.append(f"| {run['run']} | {key} | {metric} | {'-' if before is None else f'{before:.3f}'} | "
                             f"{after:.3f} | {result.get('trainable_parameters', '-')} | "
                             f"{result.get('train_samples', '-')} |")
    return "\n".join(lines)


def mean_curves(runs: list[dict], routing: str) -> dict[str, dict[int, float]]:
    """Each task's training-loss curve of `<routing>_s<seed>`, averaged over the seeds at the steps all share."""
    members = [run["training_loss"] for run in seed_runs(runs, routing) if run.get("training_loss")]
    curves = {}
    for task in sorted({t for losses in members for t in losses}):
        series = [{int(step): loss for step, loss in losses.get(task, {}).items()} for losses in members]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        curves[task] = {step: sum(s[step] for s in series) / len(series) for step in steps}
    return curves


ROUTINGS_WITH_ROUTER_LOSSES = ("token", "context")  # load-balancing and z-losses in every training step's loss


def routings_with_unlogged_router_losses(runs: list[dict]) -> list[str]:
    """The routings of `ROUTINGS_WITH_ROUTER_LOSSES` with a run whose log did not keep the routers' auxiliary
    losses apart (`aux_loss_logged`), so that its training-loss curve holds them and cannot be set beside
    the others'."""
    return [routing for routing in ROUTINGS_WITH_ROUTER_LOSSES
            if any(not run.get("aux_loss_logged") for run in seed_runs(runs, routing))]


def plot_curves(runs: list[dict], path: str) -> bool:
    """Each task's training loss, mean over seeds, one line per routing; a routing whose curves still hold the
    routers' auxiliary losses is left out, and the title says so."""
    from training.report import offscreen_pyplot

    plt = offscreen_pyplot()
    left_out = routings_with_unlogged_router_losses(runs)
    curves = {r: mean_curves(runs, r) for r in ROUTINGS if r not in left_out}
    curves = {r: c for r, c in curves.items() if c}
    if plt is None or not curves:
        return False
    tasks = sorted({t for c in curves.values() for t in c})
    columns = 3
    rows = -(-len(tasks) // columns)
    figure, panels = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axes, task in zip(panels.flat, tasks):
        for routing, by_task in curves.items():
            if task in by_task:
                steps = sorted(by_task[task])
                axes.plot(steps, [by_task[task][s] for s in steps], label="dense" if routing == "none" else routing,
                          linewidth=1.2)
        axes.set_title(task, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.set_ylabel("training loss", fontsize=8)
    for axes in list(panels.flat)[len(tasks):]:
        axes.axis("off")
    panels.flat[0].legend(fontsize=7)
    title = "training loss per task, mean over seeds (windows of 100 steps)"
    if left_out:
        title += f"\nnot drawn: {', '.join(left_out)} (their logs hold the routers' auxiliary losses in the loss)"
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def mean_matrix(runs: list[dict], routing: str, key: str = "matrix_ratio_of_means"):
    members = [run["interference"] for run in seed_runs(runs, routing) if run.get("interference", {}).get(key)]
    if not members:
        return None, None
    size = len(members[0][key])
    matrix = [[sum(m[key][i][j] for m in members) / len(members) for j in range(size)] for i in range(size)]
    return members[0]["tasks"], matrix


def plot_interference(runs: list[dict], path: str) -> bool:
    import torch

    from training.interference import plot

    found = {name: mean_matrix(runs, routing) for name, routing in (("dense", "none"), ("attribute MoE", "attribute"))}
    found = {name: value for name, value in found.items() if value[0]}
    if not found:
        return False
    names = next(iter(found.values()))[0]
    plot({name: torch.tensor(matrix) for name, (_, matrix) in found.items()}, names, path,
         "ratio of means, mean over seeds")
    return True


@dataclass
class AblationReportArguments:
    logs: list[str] = field(metadata={"positional": True, "input_files": True,
                                      "help": "the sweep_summary --json logs of the parts"})
    figures: Optional[str] = field(default=None, metadata={
        "help": "draw PREFIX_curves.png and PREFIX_interference.png"})
    cost: Optional[str] = field(default=None, metadata={
        "help": "a benchmarks.bench_moe --json log: each routing's step time against dense, eager"})


def main(argv=None) -> str:
    args = parse_script_arguments(AblationReportArguments, argv, prog="python -m benchmarks.ablation_report",
                                  description=__doc__)
    runs = load_runs(args.logs)
    variants = by_variant(runs)
    references = single_task_references(runs)
    parts = []
    if table_columns(variants):  # a log of tuned or zero-shot runs only has no routing table
        parts += [routing_table(variants, runs, references), "", "**The paper's targets on these numbers:**", "",
                  *targets(variants, references)]
    zero_shot = zero_shot_table(variants)
    if zero_shot:
        parts += ["", "**Zero-shot: one task left out of pre-training:**", "", zero_shot]
    if args.cost:
        with open(args.cost, encoding="utf-8") as handle:
            parts += ["", "**Cost: step time against dense** (`benchmarks.bench_moe`, eager, one process):", "",
                      cost_table(json.load(handle))]
    tuning = tuning_table(runs)
    if tuning:
        parts += ["", "**Downstream tuning on 1% of a task:**", "", tuning]
    text = "\n".join(parts).strip("\n")
    print(text)
    if args.figures:
        for drawn, name in ((plot_curves(runs, args.figures + "_curves.png"), "curves"),
                            (plot_interference(runs, args.figures + "_interference.png"), "interference")):
            print(f"{args.figures}_{name}.png: {'written' if drawn else 'nothing to draw'}")
    return text


if __name__ == "__main__":
    main()
