"""Runs of the trainer side by side, replicated against sharded (`train.fsdp`): their per-step losses, the
parameters process 0 holds, its peak memory and the tokens/s, from each run's `report.json` and
`metrics.jsonl`.

    python -m benchmarks.fsdp_report RUN_DIR [RUN_DIR ...] --json LOG [--command "..."]
    python -m benchmarks.fsdp_report --table LOG      # the table of a written log (docs/training.md's)

The first run is the reference of the loss column: the largest relative difference of a run's step losses
from its losses at the same steps.
"""

from __future__ import annotations

import argparse
import json
import os


def read_run(folder: str) -> dict:
    """One run's figures: its report's and its per-step training losses (the last record of a step)."""
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    losses = {}
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        for row in map(json.loads, handle):
            if "loss" in row and "task" in row:
                losses[str(row["step"])] = row["loss"]
    keys = ("fsdp", "processes", "parameters", "parameters_held", "training_peak_memory_gib",
            "median_tokens_per_second")
    missing = [key for key in keys if key not in report]
    if missing:
        raise SystemExit(f"{folder}/report.json has no {', '.join(missing)}: written by an older trainer")
    return {"run": os.path.basename(os.path.normpath(folder)), **{key: report[key] for key in keys},
            "losses": losses}


def largest_loss_difference(run: dict, reference: dict) -> float:
    """max over the steps both logged of |loss - reference loss| / |reference loss|."""
    steps = sorted(set(run["losses"]) & set(reference["losses"]), key=int)
    if not steps:
        raise SystemExit(f"runs {run['run']} and {reference['run']} logged no step in common")
    return max(abs(run["losses"][s] - reference["losses"][s]) / abs(reference["losses"][s]) for s in steps)


def table(log: dict) -> str:
    """The log's runs as a markdown table."""
    reference = log["runs"][0]
    lines = ["| run | processes | sharded | parameters | held by process 0 | "
             "process 0's peak memory in training (GiB) | tokens/s (median) | "
             f"largest step-loss difference from {reference['run']} |",
             "|---|---|---|---|---|---|---|---|"]
    for run in log["runs"]:
        held = run["parameters_held"]
        lines.append(f"| {run['run']} | {run['processes']} | {'yes' if run['fsdp'] else 'no'} | "
                     f"{run['parameters']:,} | {held:,} ({held / run['parameters']:.2f}) | "
                     f"{run['training_peak_memory_gib']:.2f} | {run['median_tokens_per_second']:,.0f} | "
                     f"{largest_loss_difference(run, reference):.1e} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders (output_dir of each), the reference first")
    parser.add_argument("--json", help="write the log here")
    parser.add_argument("--command", default="", help="the command that made the runs, kept in the log")
    parser.add_argument("--table", help="print the table of this log instead")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table, encoding="utf-8") as handle:
            log = json.load(handle)
    elif args.runs:
        log = {"command": args.command, "runs": [read_run(folder) for folder in args.runs]}
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(log, handle, indent=1)
    else:
        parser.error("give run folders or --table LOG")
    text = table(log)
    print(text)
    return text


if __name__ == "__main__":
    main()
