"""How long the trainer's data worker takes to build each task's batches: the pace a training step must not beat.

    python -m benchmarks.bench_batch_build [--config training/configs/gpu_b.yaml] [--steps 300] [--json OUT]
    python -m benchmarks.bench_batch_build --processes 1,2,3 [--steps 300]     # the worker processes' pace
    python -m benchmarks.bench_batch_build --compare-token-ids                # stored token ids vs tokenising
    python -m benchmarks.bench_batch_build --receive --processes 3 --rounds 8  # taking a waiting batch

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

With `--receive`, the time the training process takes to receive a batch that is already waiting, as the
prefetcher's `get` does: its tensors shared one by one (each a file descriptor handed over by the worker's
sharing thread) against packed into one buffer (`training.data.PackedBatch`, what the trainer uses). Both
prefetchers run side by side with the first `--processes` number of workers; each of `--rounds` rounds
lets their workers fill their queues, then takes two batches a worker from each in turn. Prints the
median and mean milliseconds per batch of each and their ratio.
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
    receive: bool = field(default=False, metadata={"help": "time taking a waiting batch from the worker processes, "
                                                            "tensor by tensor against packed"})
    rounds: int = field(default=8, metadata={"help": "rounds of --receive"})
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


def receive_times(config_path: str, overrides: list[str], processes: int, rounds: int,
                  settle_seconds: float = 3.0) -> dict[str, dict[str, list[float]]]:
    """Seconds `get` takes per batch already waiting, for batches sent tensor by tensor and packed, on the
    wall clock and as this thread's CPU time (what it holds the interpreter lock for, about): both
    prefetchers (2 batches ahead per worker) fill their queues for `settle_seconds`, then each hands over
    its waiting batches in turn, `rounds` times."""
    from training.data import ProcessPrefetcher

    depth, seconds = 2 * processes, {name: {"wall": [], "cpu": []} for name in ("tensors", "packed")}
    with tempfile.TemporaryDirectory() as output_dir:
        loader = build_loader(config_path, overrides, output_dir)
        prefetchers = {name: ProcessPrefetcher(loader, 0, depth=depth, processes=processes,
                                               packed=name == "packed") for name in seconds}
        try:
            step = 0
            for _ in range(rounds):
                time.sleep(settle_seconds)
                for name, prefetcher in prefetchers.items():
                    for offset in range(depth):
                        start, cpu = time.perf_counter(), time.thread_time()
                        prefetcher.get(step + offset)
                        seconds[name]["cpu"].append(time.thread_time() - cpu)
                        seconds[name]["wall"].append(time.perf_counter() - start)
                step += depth
        finally:
            for prefetcher in prefetchers.values():
                prefetcher.close()
    return seconds


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
    if args.receive:
        result = receive_table(args)
    else:
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


def process_counts(text: str) -> list[int]:
    try:
        counts = [int(count) for count in text.split(",") if count.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit("error: --processes takes numbers >= 1, e.g. 1,2,3")
    return counts


def pace_table(args: BenchBatchBuildArguments) -> dict:
    counts = process_counts(args.processes)
    paces = {count: prefetch_pace(args.config, args.set, args.steps, count) for count in counts}
    result = {"config": args.config, "overrides": args.set, "steps": args.steps, "cores": os.cpu_count(),
              "batches_per_second": {str(count): round(pace, 2) for count, pace in paces.items()},
              "ratio_to_first": {str(count): round(pace / paces[counts[0]], 2) for count, pace in paces.items()}}
    print(f"{args.steps} batches of {args.config} read through the worker processes ({result['cores']} cores):")
    for count, pace in paces.items():
        print(f"  {count} worker process(es): {pace:6.1f} batches/s  ({pace / paces[counts[0]]:.2f}x, "
              f"{1000 / pace:.1f} ms a batch)")
    return result


def receive_table(args: BenchBatchBuildArguments) -> dict:
    processes = process_counts(args.processes or "1")[0]
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be >= 1")
    seconds = receive_times(args.config, args.set, processes, args.rounds)
    stats = {name: {"batches": len(clocks["wall"]),
                    **{f"{clock}_{what}_ms": round(summary(values) * 1000, 2) for clock, values in clocks.items()
                       for what, summary in (("median", statistics.median), ("mean", statistics.fmean))}}
             for name, clocks in seconds.items()}
    result = {"config": args.config, "overrides": args.set, "processes": processes, "rounds": args.rounds,
              "cores": os.cpu_count(), "receive": stats,
              **{f"tensors_vs_packed_{clock}_median": round(stats["tensors"][f"{clock}_median_ms"]
                                                             / stats["packed"][f"{clock}_median_ms"], 2)
                 for clock in ("wall", "cpu")}}
    print(f"taking a waiting batch of {args.config} from {processes} worker process(es) ({result['cores']} cores, "
          f"{args.rounds} rounds), milliseconds per batch:")
    for name, row in stats.items():
        print(f"  {name:8s} wall median {row['wall_median_ms']:7.2f} mean {row['wall_mean_ms']:7.2f}   "
              f"this thread's CPU median {row['cpu_median_ms']:6.2f} mean {row['cpu_mean_ms']:6.2f}  ({row['batches']} batches)")
    print(f"  tensor by tensor / packed (medians): wall {result['tensors_vs_packed_wall_median']:.2f}x, "
          f"CPU {result['tensors_vs_packed_cpu_median']:.2f}x")
    return result


if __name__ == "__main__":
    main()
