"""How long the trainer's data worker takes to build each task's batches: the pace a training step must not beat.

    python -m benchmarks.bench_batch_build [--config training/configs/gpu_b.yaml] [--steps 300] [--json OUT]
    python -m benchmarks.bench_batch_build --processes 1,2,3 [--steps 300]     # the worker processes' pace
    python -m benchmarks.bench_batch_build --compare-token-ids                # stored token ids vs tokenising

Builds the config's first `--steps` training batches in step order in this process, as the trainer's one
prefetch worker does (`MultiTaskLoader.batch`: reading the rows, decoding and resizing images, tokenising,
masking), and prints the mean milliseconds per batch over all steps and the median and mean per task. With
`data.prefetch_worker: process` these batches come from one worker process, so a step shorter than the
mean here leaves the training loop waiting for data. The batches depend on the model's image size, patch
size and tokenizer, not on its width or depth, so the trainer is built with a one-layer model of width 32
(`--set` overrides as in `training.pretrain`; `data.text_padding` defaults to `buckets`, as compiled runs use).
The worker process runs torch on one thread, this process on its default; building a batch is mostly
image decoding and tokenising, which do not use torch's threads. A slice built with its texts' token ids
(`build_data.add_token_ids`) skips the tokenizer; `--compare-token-ids` builds the same batches a second
time tokenising every text and prints both side by side.

With `--processes`, the same batches come instead through the trainer's prefetcher
(`training.data.ProcessPrefetcher`, each worker process owning a share of the tasks) for each number of
worker processes given, read as fast as they come: the batches per second each number sustains, side by
side, and its ratio to the first.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from modeling_uniperceiver_moe.command_line import parse_script_arguments

SMALL_MODEL = ["model.model_size=null", "model.hidden_size=32", "model.num_hidden_layers=1",
               "model.num_attention_heads=1", "model.moe_routing=none"]


@dataclass
class BenchBatchBuildArguments:
    config: str = field(default="training/configs/gpu_b.yaml", metadata={"help": "a pre-training config"})
    steps: int = field(default=300, metadata={"help": "training batches to build, from step 0"})
    processes: str = field(default="", metadata={"help": "comma-separated numbers of worker processes to read the "
                                                        "batches through instead (data.prefetch_processes)"})
    compare_token_ids: bool = field(default=False, metadata={"help": "also build the same batches tokenising every "
                                                                      "text instead of packing the slice's stored "
                                                                      "token ids, and print both side by side"})
    set: list[str] = field(default_factory=list, metadata={"help": "config overrides key=value (repeatable)"})
    json: Optional[str] = field(default=None, metadata={"help": "write the results here"})


def build_loader(config_path: str, overrides: list[str], output_dir: str):
    """The trainer's training loader for the config, built beside a one-layer model of width 32."""
    from training.config import load_config
    from training.trainer import Pretrainer

    config = load_config(config_path, ["data.text_padding=buckets"] + list(overrides) + SMALL_MODEL + [
        f"output_dir={output_dir}", "train.tracker=null", "data.prefetch=0", "train.compile=false"])
    return Pretrainer(config).loader


def prefetch_pace(config_path: str, overrides: list[str], steps: int, processes: int) -> float:
    """Batches per second that `processes` worker processes hand over, over `steps` batches read without
    pause (the workers' start and first batch left out: the clock starts at the second batch)."""
    from training.data import ProcessPrefetcher

    with tempfile.TemporaryDirectory() as output_dir:
        prefetcher = ProcessPrefetcher(build_loader(config_path, overrides, output_dir), 0, depth=8,
                                       processes=processes)
        try:
            prefetcher.get(0)
            start = time.perf_counter()
            for step in range(1, steps):
                prefetcher.get(step)
            return (steps - 1) / (time.perf_counter() - start)
        finally:
            prefetcher.close()


def build_times(config_path: str, overrides: list[str], steps: int,
                stored_token_ids: bool = True) -> tuple[dict[str, list[float]], float]:
    """Seconds to build each of the first `steps` batches, per task, and the seconds for all of them; with
    `stored_token_ids=False` every text is tokenised, as for a slice without them."""
    with tempfile.TemporaryDirectory() as output_dir:
        loader = build_loader(config_path, overrides, output_dir)
        if not stored_token_ids:
            loader.ctx.token_id_tasks = frozenset()
        seconds: dict[str, list[float]] = {}
        began = time.perf_counter()
        for step in range(steps):
            start = time.perf_counter()
            batch = loader.batch(step)
            seconds.setdefault(batch.task.name, []).append(time.perf_counter() - start)
        return seconds, time.perf_counter() - began


def main(argv=None) -> dict:
    args = parse_script_arguments(BenchBatchBuildArguments, argv, prog="python -m benchmarks.bench_batch_build",
                                  description=__doc__)
    if args.steps < 2:
        raise SystemExit("error: --steps must be >= 2")
    result = pace_table(args) if args.processes else build_table(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


def task_rows(seconds: dict[str, list[float]]) -> dict[str, dict]:
    tasks = {}
    for name in sorted(seconds):
        # a task's first batch also opens its stream: left out of its median and mean when there are others
        values = seconds[name][1:] or seconds[name]
        tasks[name] = {"batches": len(seconds[name]), "median_ms": round(statistics.median(values) * 1000, 1),
                       "mean_ms": round(statistics.fmean(values) * 1000, 1)}
    return tasks


def build_table(args: BenchBatchBuildArguments) -> dict:
    seconds, total = build_times(args.config, args.set, args.steps)
    tasks = task_rows(seconds)
    result = {"config": args.config, "overrides": args.set, "steps": args.steps, "cores": os.cpu_count(),
              "mean_ms_per_batch": round(total / args.steps * 1000, 1), "tasks": tasks}
    print(f"{args.steps} batches of {args.config} built in one process: {result['mean_ms_per_batch']:.1f} ms a "
          f"batch on average ({result['cores']} cores)")
    if not args.compare_token_ids:
        for name, row in tasks.items():
            print(f"{name:34s} {row['batches']:4d} batches  median {row['median_ms']:7.1f} ms  mean {row['mean_ms']:7.1f} ms")
        return result
    seconds, total = build_times(args.config, args.set, args.steps, stored_token_ids=False)
    result["tokenised"] = {"mean_ms_per_batch": round(total / args.steps * 1000, 1), "tasks": task_rows(seconds)}
    tokenised = result["tokenised"]
    print(f"the same batches tokenising every text: {tokenised['mean_ms_per_batch']:.1f} ms a batch "
          f"({tokenised['mean_ms_per_batch'] / result['mean_ms_per_batch']:.2f}x)")
    print(f"{'task':34s} {'batches':>7s}  stored ids: mean ms  tokenised: mean ms  ratio")
    for name, row in tasks.items():
        other = tokenised["tasks"][name]["mean_ms"]
        print(f"{name:34s} {row['batches']:7d}  {row['mean_ms']:19.1f}  {other:18.1f}  {other / row['mean_ms']:5.2f}x")
    return result


def pace_table(args: BenchBatchBuildArguments) -> dict:
    try:
        counts = [int(count) for count in args.processes.split(",") if count.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit("error: --processes takes numbers >= 1, e.g. 1,2,3")
    paces = {count: prefetch_pace(args.config, args.set, args.steps, count) for count in counts}
    result = {"config": args.config, "overrides": args.set, "steps": args.steps, "cores": os.cpu_count(),
              "batches_per_second": {str(count): round(pace, 2) for count, pace in paces.items()},
              "ratio_to_first": {str(count): round(pace / paces[counts[0]], 2) for count, pace in paces.items()}}
    print(f"{args.steps} batches of {args.config} read through the worker processes ({result['cores']} cores):")
    for count, pace in paces.items():
        print(f"  {count} worker process(es): {pace:6.1f} batches/s  ({pace / paces[counts[0]]:.2f}x, "
              f"{1000 / pace:.1f} ms a batch)")
    return result


if __name__ == "__main__":
    main()
