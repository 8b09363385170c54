"""Summarise the runs of `benchmarks/sweep_gpu.sh`: each run's held-out curve per task, its speed, and the
plain baselines trained beside it.

    python -m benchmarks.sweep_summary SWEEP_DIR [SWEEP_DIR ...] [--json OUT.json --command "..."]

Prints one block per run (what sweep_gpu.sh shows at the end of a call), then, for runs named
`<variant>_s<seed>`, one table of every task's last held-out value per variant: the mean over its seeds
with the spread (min-max) and the seed count, the median steps/s, and, where the run holds
`interference/interference.json` (sweep_gpu.sh's INTERFERENCE_TASKS), the mean off-diagonal interference
(the paper's mean of ratios, and the ratio of means) and, for MoE runs, the tasks' mean expert overlap
(`training.interference`), and the results of the runs' tuning on downstream tasks (sweep_gpu.sh's
TUNE_RUNS; `tuning` below). `--json` also writes
`{"command", "runs": [{"run", "held_out": {task: {step: value}}, "other_metrics": {"task/metric": {step: value}},
"distinct_answers": {task: {step: n}},
"trivial_baseline": {task: value}, "word_trivial_baseline": {captioning task: value},
"median_steps_per_second", "gradient_norms": {task: {"steps", "min", "median"}},
"training_loss": {task: {step: mean over LOSS_WINDOW steps}}, "plain",
"interference": {"tasks", "matrix", "matrix_ratio_of_means", off-diagonal means, expert overlap, entropy and usage},
"tuning": {"task/method": {"before", "after", ...}}}]}` for docs/logs. The trivial baselines (majority class, most frequent word, chance
recall) come from the run's report.json, so a run that did not finish has none; they move with the seed,
which draws the held-out rows. The gradient norms are before clipping: a task whose minimum is above `optim.grad_clip` had
every one of its steps clipped. A run found in several folders (a warm machine keeps earlier calls' runs)
is read once.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from modeling_uniperceiver_moe.command_line import parse_script_arguments
from training.evaluation import SECONDARY_METRICS

HEADLINE = ("accuracy", "token_accuracy", "i2t_R@1")


def gradient_norms_by_task(rows: list[dict]) -> dict[str, dict]:
    """`{task: {"steps", "min", "median"}}` of the pre-clip gradient norms of the optimizer steps in `rows`
    (metrics.jsonl lines; a step is logged with the task of its last micro-batch)."""
    norms: dict[str, list[float]] = {}
    for row in rows:
        if "grad_norm" in row and "task" in row:
            norms.setdefault(row["task"], []).append(float(row["grad_norm"]))
    return {task: {"steps": len(values), "min": round(min(values), 3),
                   "median": round(sorted(values)[len(values) // 2], 3)}
            for task, values in sorted(norms.items())}


LOSS_WINDOW = 100  # steps per point of a run's training-loss curve


def training_loss_curves(rows: list[dict], window: int = LOSS_WINDOW) -> dict[str, dict[int, float]]:
    """`{task: {step: mean loss}}`: each task's own training loss (metrics.jsonl lines with a `task` and a
    `loss`, less the routers' auxiliary losses where the line logs them as `aux_loss`), averaged over windows
    of `window` steps; each point is keyed by its window's last step."""
    sums: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if "task" in row and "loss" in row and "step" in row:
            end = -(-int(row["step"]) // window) * window
            own = float(row["loss"]) - float(row.get("aux_loss", 0.0))
            sums.setdefault(row["task"], {}).setdefault(end, []).append(own)
    return {task: {end: round(sum(v) / len(v), 4) for end, v in sorted(points.items())}
            for task, points in sorted(sums.items())}


def summarise_run(run_dir: str) -> dict:
    """One run's `{"run", "steps", "max_steps", "held_out", "other_metrics", "distinct_answers",
    "trivial_baseline", "median_steps_per_second", "gradient_norms", "training_loss", "aux_loss_logged",
    "plain", "interference", "tuning"}` (`held_out`: each task's headline metric, `other_metrics`: those of
    `training.evaluation.SECONDARY_METRICS` it reports, generated captions' scores in a final evaluation only;
    both `{"task/metric": {step: value}}`; `steps` below `max_steps` where train.max_minutes stopped it) from its
    metrics.jsonl, its report.json (when the run finished; without it no steps), its interference.json and
    tunings (when measured) and (when its plain baselines were trained beside it) baselines/baselines.json.
    `aux_loss_logged` says whether its metrics.jsonl logged the routers' auxiliary losses apart (a run of a
    trainer that did not has them inside `training_loss`)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    speeds = sorted(r["steps_per_second"] for r in rows if "steps_per_second" in r)
    held_out: dict[str, dict[int, float]] = {}
    other: dict[str, dict[int, float]] = {}
    distinct: dict[str, dict[int, int]] = {}
    for row in rows:
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in HEADLINE:
                held_out.setdefault(f"{parts[1]}/{parts[2]}", {})[row["step"]] = round(value, 4)
            elif len(parts) == 3 and parts[0] == "eval" and parts[2] in SECONDARY_METRICS:
                other.setdefault(f"{parts[1]}/{parts[2]}", {})[row["step"]] = round(value, 4)
            elif len(parts) == 3 and parts[0] == "eval" and parts[2] == "distinct_predictions":
                distinct.setdefault(parts[1], {})[row["step"]] = int(value)
    plain_path = os.path.join(run_dir, "baselines", "baselines.json")
    plain = {}
    if os.path.exists(plain_path):
        with open(plain_path) as handle:
            for task, result in json.load(handle)["plain"].items():
                plain[task] = {"model": result["model"],
                               "curve": {p["step"]: round(p["accuracy"], 4) for p in result["curve"]}}
    trivial, word_trivial, steps = {}, {}, {}
    report_path = os.path.join(run_dir, "report.json")
    if os.path.exists(report_path):
        with open(report_path) as handle:
            report = json.load(handle)
        report_rows = report["tasks"]
        steps = {key: report[key] for key in ("steps", "max_steps") if key in report}
        trivial = {row["task"]: round(row["trivial_baseline"], 4) for row in report_rows
                   if row.get("trivial_baseline") is not None}
        word_trivial = {row["task"]: round(row["word_trivial_baseline"], 4) for row in report_rows
                        if row.get("word_trivial_baseline") is not None}
    interference = {}
    interference_path = os.path.join(run_dir, "interference", "interference.json")
    if os.path.exists(interference_path):
        with open(interference_path) as handle:
            written = json.load(handle)
        interference = {"tasks": written["tasks"], "off_diagonal_mean_of_ratios": off_diagonal_mean(written["matrix"]),
                        "off_diagonal_ratio_of_means": off_diagonal_mean(written["matrix_ratio_of_means"]),
                        "matrix": written["matrix"], "matrix_ratio_of_means": written["matrix_ratio_of_means"]}
        if "expert_overlap" in written:  # an MoE model: how much the tasks share experts
            interference["off_diagonal_expert_overlap"] = off_diagonal_mean(written["expert_overlap"])
            interference["expert_entropy"] = written.get("expert_entropy", {})
            interference["expert_usage"] = written.get("expert_usage", {})
    return {"run": os.path.basename(run_dir), **steps, "held_out": held_out, "other_metrics": other,
            "distinct_answers": distinct, "trivial_baseline": trivial, "word_trivial_baseline": word_trivial,
            "median_steps_per_second": round(speeds[len(speeds) // 2], 2) if speeds else None,
            "gradient_norms": gradient_norms_by_task(rows), "training_loss": training_loss_curves(rows),
            "aux_loss_logged": any("aux_loss" in row for row in rows),
            "plain": plain, "interference": interference,
            "tuning": summarise_tuning(run_dir)}


TUNING_FIELDS = ("train_samples", "trainable_parameters", "selected_step", "steps_trained", "train_seconds")


def summarise_tuning(run_dir: str) -> dict[str, dict]:
    """`{"task/method": {"before", "after", *TUNING_FIELDS}}` from the run's `tune-<task>-<method>/results.json`
    (the TUNE_RUNS of sweep_gpu.sh or sweep_cpu.sh: `prompt_tuning.run_prompt_tuning` on the run's final
    model): the held-out metrics of the pre-trained model as it is (`before`; none for a linear probe, which
    starts from a new head) and of the tuned one (`after`)."""
    tuned = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "tune-*", "results.json"))):
        with open(path) as handle:
            written = json.load(handle)
        numbers = {key: {name: round(value, 4) for name, value in written.get(key, {}).items()
                         if isinstance(value, float)} for key in ("before", "after")}
        tuned[f"{written['task']}/{written['method']}"] = dict(
            numbers, **{key: written[key] for key in TUNING_FIELDS if key in written})
    return tuned


def off_diagonal_mean(matrix: list[list[float]]) -> float:
    values = [value for i, row in enumerate(matrix) for j, value in enumerate(row) if i != j]
    return round(sum(values) / len(values), 4)


SEED_SUFFIX = re.compile(r"_s(\d+)$")
INTERFERENCE_SUMMARIES = {  # a variant's means over its seeds of these interference.json summaries
    "off_diagonal_mean_of_ratios": "interference off the diagonal (mean of ratios)",
    "off_diagonal_ratio_of_means": "interference off the diagonal (ratio of means)",
    "off_diagonal_expert_overlap": "tasks' expert overlap off the diagonal (MoE)",
}


def by_variant(runs: list[dict]) -> dict[str, dict]:
    """Runs named `<variant>_s<seed>` grouped by variant: per held-out series (`task/metric`, headline and
    other metrics) the last
    value of each seed, their mean and min-max; the seeds; the median steps/s over the seeds' medians; the
    mean off-diagonal interference where measured. Runs without a seed suffix are left out."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        match = SEED_SUFFIX.search(run["run"])
        if match:
            groups.setdefault(run["run"][:match.start()], []).append(run)
    table = {}
    for variant, members in sorted(groups.items()):
        curves = [{**run.get("other_metrics", {}), **run["held_out"]} for run in members]
        series = sorted({key for run in curves for key in run})
        values = {key: [run[key][max(run[key], key=int)] for run in curves if run.get(key)] for key in series}
        speeds = sorted(run["median_steps_per_second"] for run in members if run["median_steps_per_second"])
        interference = [run["interference"] for run in members if run.get("interference")]
        table[variant] = {
            "seeds": sorted(int(SEED_SUFFIX.search(run["run"]).group(1)) for run in members),
            "held_out": {key: {"values": v, "mean": round(sum(v) / len(v), 4), "min": min(v), "max": max(v)}
                         for key, v in values.items() if v},
            "median_steps_per_second": speeds[len(speeds) // 2] if speeds else None,
            "interference": {key: round(sum(i[key] for i in interference) / len(interference), 4)
                             for key in INTERFERENCE_SUMMARIES if all(key in i for i in interference)}
            if interference else {}}
    return table


def format_variants(table: dict[str, dict]) -> str:
    """A markdown table: one row per held-out series, one column per variant ("mean (min-max, n)")."""
    variants = list(table)
    series = sorted({key for entry in table.values() for key in entry["held_out"]})
    lines = ["| held-out, last evaluation | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for key in series:
        cells = []
        for variant in variants:
            entry = table[variant]["held_out"].get(key)
            cells.append("-" if entry is None else
                         f"{entry['mean']:.3f} ({entry['min']:.3f}-{entry['max']:.3f}, {len(entry['values'])})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| median steps/s | " + " | ".join(
        "-" if table[v]["median_steps_per_second"] is None else f"{table[v]['median_steps_per_second']:.2f}"
        for v in variants) + " |")
    for key, label in INTERFERENCE_SUMMARIES.items():
        if any(key in table[v]["interference"] for v in variants):
            lines.append(f"| {label} | " + " | ".join(
                f"{table[v]['interference'][key]:.3f}" if key in table[v]["interference"] else "-"
                for v in variants) + " |")
    return "\n".join(lines)


def find_runs(folders: list[str]) -> list[str]:
    """Run folders (those holding metrics.jsonl) of the sweep folders, each name once (the last folder wins)."""
    runs = {}
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*", "metrics.jsonl"))):
            runs[os.path.basename(os.path.dirname(path))] = os.path.dirname(path)
    return [runs[name] for name in sorted(runs)]


def format_run(summary: dict) -> str:
    speed = summary["median_steps_per_second"] or 0
    lines = [f"{summary['run']}  (median {speed:.1f} steps/s)"]
    for key, curve in summary["held_out"].items():
        trivial = summary.get("trivial_baseline", {}).get(key.split("/")[0])
        note = "" if trivial is None else f"  (trivial {trivial:.4f})"
        lines.append(f"  {key:52s} {' '.join(f'{step}:{value:.4f}' for step, value in curve.items())}{note}")
    for task, result in summary["plain"].items():
        points = " ".join(f"{step}:{value:.4f}" for step, value in result["curve"].items())
        lines.append(f"  {task + ' ' + result['model']:52s} {points}")
    for key, result in summary.get("tuning", {}).items():
        after = " ".join(f"{name} {value:.4f}" for name, value in result["after"].items())
        before = " ".join(f"{name} {value:.4f}" for name, value in result["before"].items()) or "-"
        lines.append(f"  tuned {key:46s} before: {before}; after: {after}")
    return "\n".join(lines)


@dataclass
class SweepSummaryArguments:
    folders: list[str] = field(metadata={"positional": True, "help": "sweep folders (each holds one folder per run)"})
    json: Optional[str] = field(default=None, metadata={"help": "also write the summary here"})
    command: str = field(default="", metadata={"help": "the command that made the runs (stored in --json)"})


def main(argv=None) -> list[dict]:
    args = parse_script_arguments(SweepSummaryArguments, argv, prog="python -m benchmarks.sweep_summary", description=__doc__)
    runs = []
    for path in find_runs(args.folders):
        runs.append(summarise_run(path))
        print(format_run(runs[-1]))
        comparison = os.path.join(path, "baselines", "comparison.md")
        if os.path.exists(comparison):
            print(open(comparison).read())
    variants = by_variant(runs)
    if variants:
        print(format_variants(variants))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": args.command, "runs": runs, "variants": variants}, handle, indent=1)
    return runs


if __name__ == "__main__":
    main()
