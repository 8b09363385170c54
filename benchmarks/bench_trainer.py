"""The trainer's speed beside the model's, measured in one run on the same batches.

    python -m benchmarks.bench_trainer --sizes ti,b --routings none,attribute,token --json out.json        # GPU
    python -m benchmarks.bench_trainer --config training/configs/tiny_cpu.yaml --sizes config \\
        --routings attribute --warmup 2 --steps 4 --profile-steps 2                                      # CPU

For each (size, routing, prefetch worker, number of worker processes, pixel transport), one `Pretrainer` of the
config (`--set` overrides as in `training.pretrain`, except the settings the benchmark fixes: evaluation and
checkpoints off, a temporary output folder; `--prefetch-processes 1,3` compares the numbers of data worker
processes, `--pixel-transports uint8,float32,uint8` the pixels handed over as bytes or floats, a repeated value
measuring the spread between variants of one process, whose later variants reuse the first one's compiled graphs):

1. trainer: `--warmup` then `--steps` steps of the trainer's own loop; tokens/s over the measured steps
   (the tokens each step ran through the encoder, candidates included, as the trainer logs them), and the
   seconds the warm-up steps took (with `--set train.compile=true`, the compilation's cost) and the graphs
   compiled during the measured steps (a shape the warm-up did not reach; it should be 0), and the CUDA graphs
   recorded during them (`trainer.CudaGraphRecordings`: a new path of compiled calls through a step; with
   `--windows N`, tokens/s and recordings per window show how the trainer's speed follows them).
2. where the time goes: `--profile-steps` more trainer steps under `torch.profiler`: the host time of each
   region of `Pretrainer.train_step` (`trainer.STEP_REGIONS`: waiting for the batch, the copy to the device,
   forward with the loss, backward, clip and update, bookkeeping) as shares of the wall time, and on a GPU
   the share of the wall time its kernels are busy; with `--profile-ops N`, the N operations with the most
   self host time.
3. model: the bare step (forward, loss, backward, clip, AdamW) of the same model and optimizer on the very
   batches the measured trainer steps trained on, built again from the start of the data and put on the
   device beforehand: no data work, no logging, no host synchronisation of its own.
4. loop: the trainer's own loop again (its step, the result reads, the scheduler, logging) on those batches
   already on the device, so that `trainer / loop` is what the data path costs (waiting for the workers,
   pinning, the copy) and `loop / model` what the loop adds to the bare step.

Each phase also counts Python's garbage collections and the seconds they took (`gc_trainer`, `gc_model`,
`gc_loop` in the JSON rows): a full collection walks every object of the process, the compiled graphs'
included.

Prints a table with `trainer / model` and `loop / model` per variant; `--json PATH` writes every row.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from modeling_uniperceiver_moe.command_line import parse_script_arguments


@dataclass
class BenchTrainerArguments:
    config: str = field(default="training/configs/gpu_b.yaml", metadata={"help": "a pre-training config"})
    sizes: str = field(default="ti,b", metadata={"help": "model.model_size values, comma-separated; "
                                                          "'config' keeps the config's model"})
    routings: str = field(default="none,attribute,token", metadata={"help": "model.moe_routing values"})
    prefetch_workers: str = field(default="process", metadata={"help": "data.prefetch_worker values (process, thread)"})
    prefetch_processes: str = field(default="", metadata={"help": "data.prefetch_processes values (worker "
                                                                 "processes of prefetch_worker: process); "
                                                                 "default: the config's"})
    pixel_transports: str = field(default="", metadata={"help": "data.pixel_transport values (uint8, float32; "
                                                                 "a value may repeat); default: the config's"})
    warmup: int = field(default=20, metadata={"help": "trainer steps before the measured ones"})
    steps: int = field(default=60, metadata={"help": "measured steps (trainer, then the model on the same batches)"})
    windows: int = field(default=1, metadata={"help": "also report the trainer's tokens/s over this many equal "
                                                      "windows of the measured steps"})
    profile_steps: int = field(default=10, metadata={"help": "profiled trainer steps after the measured ones"})
    profile_ops: int = field(default=0, metadata={"help": "also list the N operations with the most host time "
                                                          "of the profiled steps (trainer regions left out)"})
    set: list[str] = field(default_factory=list, metadata={"help": "config overrides key=value (repeatable)"})
    json: Optional[str] = field(default=None, metadata={"help": "write the rows here"})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_overrides(args: BenchTrainerArguments, size: str, routing: str, output_dir: str,
                      prefetch_worker: str = "process", prefetch_processes: int | None = None,
                      pixel_transport: str | None = None) -> list[str]:
    total = args.warmup + args.steps + args.profile_steps
    overrides = list(args.set) + [f"output_dir={output_dir}", f"train.max_steps={total}", "train.eval_every=0",
                 "train.save_every=0", "train.tracker=null", "train.max_minutes=null", "train.grad_accum=1",
                 f"train.log_every={total}", f"model.moe_routing={routing}", f"data.prefetch_worker={prefetch_worker}"]
    if prefetch_processes is not None:
        overrides.append(f"data.prefetch_processes={prefetch_processes}")
    if pixel_transport is not None:
        overrides.append(f"data.pixel_transport={pixel_transport}")
    if size != "config":
        overrides.append(f"model.model_size={size}")
    return overrides  # the benchmark's own settings win over --set


def prefetch_worker_label(config) -> str:
    """Where the variant's batches are built: "none" (in the loop), "thread", "process" or "process x N"."""
    data = config.data
    if data.prefetch <= 0:
        return "none"
    if data.prefetch_worker == "process" and data.prefetch_processes > 1:
        return f"process x{data.prefetch_processes}"
    return data.prefetch_worker


def busy_seconds(events) -> float:
    """Seconds during which at least one kernel, copy or memset ran on the device: the union of the device
    activities' intervals (user annotations, which span many kernels, left out)."""
    from torch.autograd import DeviceType

    intervals = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    busy, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def top_host_operations(profiler, wall: float, count: int) -> list[dict]:
    """The `count` operations (and `record_function` regions other than the trainer's own) with the most
    self host time in the profiled steps: name, calls, self host seconds and their share of `wall`."""
    from training.trainer import STEP_REGIONS

    events = [event for event in profiler.key_averages() if event.key not in STEP_REGIONS]
    events.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return [{"name": event.key, "calls": event.count, "self_host_s": round(event.self_cpu_time_total / 1e6, 4),
             "share": round(event.self_cpu_time_total / 1e6 / wall, 4)} for event in events[:count]]


def profile_shares(profiler, wall: float, device: torch.device) -> dict:
    """Host time of each trainer region, and the GPU's busy time, as shares of `wall` seconds."""
    from training.trainer import STEP_REGIONS

    host = {name: 0.0 for name in STEP_REGIONS}
    for event in profiler.key_averages():
        if event.key in host:
            host[event.key] += event.cpu_time_total / 1e6
    shares = {name.split("/", 1)[1]: round(seconds / wall, 4) for name, seconds in host.items()}
    shares["other"] = round(max(0.0, 1.0 - sum(shares.values())), 4)
    return {"host_time_shares": shares,
            "gpu_busy_share": round(busy_seconds(profiler.events()) / wall, 4) if device.type == "cuda" else None}


class CollectorClock:
    """Python's garbage collections while installed in `gc.callbacks`: how many of each generation, and the
    seconds they took (a full collection walks every object of the process, the compilation's included)."""

    def __init__(self):
        self.counts, self.seconds, self._began = [0, 0, 0], [0.0, 0.0, 0.0], None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            generation = info["generation"]
            self.counts[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._began
            self._began = None

    def reading(self) -> tuple[list[int], list[float]]:
        return list(self.counts), list(self.seconds)

    @staticmethod
    def between(start: tuple, end: tuple) -> dict:
        """The collections between two `reading()`s: counts per generation (0, 1, 2) and seconds in all and in
        full (generation 2) collections."""
        counts = [b - a for a, b in zip(start[0], end[0])]
        seconds = [b - a for a, b in zip(start[1], end[1])]
        return {"collections": counts, "seconds": round(sum(seconds), 4), "full_seconds": round(seconds[2], 4)}


def recorded_between(start: tuple, end: tuple, suffix: str) -> dict:
    """The CUDA graphs recorded between two `CudaGraphRecordings.reading()`s and the seconds it took, as row
    fields `cuda_graphs_recorded[_suffix]` and `cuda_graph_recording_s[_suffix]`."""
    tail = f"_{suffix}" if suffix else ""
    return {f"cuda_graphs_recorded{tail}": end[0] - start[0],
            f"cuda_graph_recording_s{tail}": round(end[1] - start[1], 3)}


def progress(name: str, what: str, since: float) -> None:
    """One line on stdout as a variant goes (a run stopped by a time limit still says how far it got)."""
    from training.trainer import compiled_graph_count

    print(f"[{name}] {what}: {time.perf_counter() - since:.1f} s, {compiled_graph_count()} graphs compiled", flush=True)


def measure_variant(args: BenchTrainerArguments, size: str, routing: str, prefetch_worker: str = "process",
                    prefetch_processes: int | None = None, pixel_transport: str | None = None) -> dict:
    from tqdm.auto import tqdm

    from training.config import load_config, pixel_transport as resolved_pixel_transport
    from training.tasks import task_loss
    from training.trainer import CudaGraphRecordings, Pretrainer, compiled_graph_count, read_step_result

    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(args.config, variant_overrides(args, size, routing, output_dir, prefetch_worker,
                                                                prefetch_processes, pixel_transport))
        trainer = Pretrainer(config)
        device = trainer.accelerator.device
        first, last = args.warmup, args.warmup + args.steps
        results, stamps, graphs, collections, recordings = [], {}, {0: compiled_graph_count()}, {}, {}
        bounds = sorted({first + round(index * args.steps / args.windows) for index in range(args.windows + 1)})
        profiled = {"profiler": None}
        step_once = trainer.train_step

        workers = prefetch_worker_label(config)
        pixels = resolved_pixel_transport(config, device.type)
        name = f"{size}/{routing}/{workers}/{pixels}"
        every = max(1, first // 8)

        def timed_step(index: int) -> dict:  # the trainer's own step; the clock is read (after a device
            result = step_once(index)        # synchronisation) only where the measured steps start and end
            results.append(result)
            if len(results) < first and len(results) % every == 0:  # progress of a long (compiling) warm-up
                progress(name, f"warm-up step {len(results)}/{first}", stamps[0])
            if len(results) in bounds:
                synchronize(device)
                stamps[len(results)] = time.perf_counter()
                graphs[len(results)] = compiled_graph_count()
                collections[len(results)] = clock.reading()
                recordings[len(results)] = CudaGraphRecordings.reading()
            if len(results) == first:
                progress(name, f"warm-up done ({first} steps)", stamps[0])
            if len(results) == last:
                progress(name, f"{args.steps} measured steps done", stamps[0])
            if len(results) == last and args.profile_steps:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                profiled["profiler"] = torch.profiler.profile(activities=activities)
                profiled["profiler"].__enter__()
            return result

        trainer.train_step = timed_step
        trainer.prefetcher = trainer.start_prefetcher()
        clock = CollectorClock()
        gc.callbacks.append(clock)
        synchronize(device)
        stamps[0] = time.perf_counter()
        try:
            trainer._train_steps(tqdm(disable=True))
        finally:
            trainer.prefetcher.close()
            gc.callbacks.remove(clock)
        synchronize(device)
        stamps["end"] = time.perf_counter()
        if profiled["profiler"] is not None:
            profiled["profiler"].__exit__(None, None, None)
        tokens = [read_step_result(result)["tokens"] for result in results]
        tasks = [result["task"] for result in results]
        trainer_seconds = stamps[last] - stamps[first]
        measured_tokens = sum(tokens[first:last])
        row = {"size": size, "routing": routing, "device": str(device),
               "prefetch_worker": workers, "pixel_transport": pixels,
               "compile": config.train.compile_mode if trainer.compiled else "eager",
               "text_padding": trainer.ctx.text_padding,
               "warmup_seconds": round(stamps[first] - stamps[0], 2),
               # graphs torch.compile built while the measured steps ran: 0 unless the warm-up missed a shape
               "graphs_compiled_while_measured": graphs[last] - graphs.get(first, graphs[0]),
               "steps": args.steps,
               "tokens": measured_tokens, "trainer_tokens_per_s": round(measured_tokens / trainer_seconds, 1),
               "gc_trainer": CollectorClock.between(collections[first], collections[last])}
        row.update(recorded_between(recordings[first], recordings[last], "while_measured"))
        if len(bounds) > 2:
            row["windows"] = [{"steps": [start, end],
                               "tokens_per_s": round(sum(tokens[start:end]) / (stamps[end] - stamps[start]), 1),
                               **recorded_between(recordings[start], recordings[end], "")}
                              for start, end in zip(bounds, bounds[1:])]
            for window in row["windows"]:
                print(f"[{name}] steps {window['steps'][0]}-{window['steps'][1]}: {window['tokens_per_s']:,.0f} "
                      f"tokens/s, {window['cuda_graphs_recorded']} CUDA graphs recorded", flush=True)
        if args.profile_steps:
            row.update(profile_shares(profiled["profiler"], stamps["end"] - stamps[last], device))
            if args.profile_ops:
                row["top_host_ops"] = top_host_operations(profiled["profiler"], stamps["end"] - stamps[last],
                                                          args.profile_ops)
                for op in row["top_host_ops"]:
                    print(f"[{name}] host {op['share']:6.1%} {op['calls']:6d} calls  {op['name']}", flush=True)

        # the bare model step on the same batches
        loader = trainer.build_loader()
        batches = [loader.batch(step) for step in range(last)][first:]
        if [batch.task.name for batch in batches] != tasks[first:last]:
            raise RuntimeError("the rebuilt batches are not the ones the trainer trained on")
        batches = [batch.to(device) for batch in batches]
        progress(name, f"{len(batches)} batches rebuilt for the bare model step", stamps[0])
        model, optimizer = trainer.model, trainer.optimizer
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf

        def model_step(batch) -> None:
            loss_weight = config.tasks[batch.task.name].loss_weight
            loss_weight = batch.task.loss_weight if loss_weight is None else loss_weight
            if trainer.compiled:
                torch.compiler.cudagraph_mark_step_begin()  # as the trainer's step does
            output = model(**batch.inputs, task_family=batch.task.family)
            loss = task_loss(batch, output, trainer.model_config.label_smoothing_for(batch.task.family),
                             across_processes=False)
            trainer.accelerator.backward(loss * loss_weight)
            trainer.accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        model_step(batches[0])  # the first one again pays any lazy initialisation outside the timing
        gc.callbacks.append(clock)
        try:
            synchronize(device)
            began, collected, recorded = time.perf_counter(), clock.reading(), CudaGraphRecordings.reading()
            for batch in batches:
                model_step(batch)
            synchronize(device)
            model_seconds = time.perf_counter() - began
            row["gc_model"] = CollectorClock.between(collected, clock.reading())
            row.update(recorded_between(recorded, CudaGraphRecordings.reading(), "model"))
        finally:
            gc.callbacks.remove(clock)
        progress(name, f"{len(batches)} bare model steps done", stamps[0])
        row["model_tokens_per_s"] = round(measured_tokens / model_seconds, 1)
        row["trainer_vs_model"] = round(row["trainer_tokens_per_s"] / row["model_tokens_per_s"], 3)

        # the trainer's own loop on the same batches, already on the device: the loop without the data path
        gc.callbacks.append(clock)
        try:
            collected, recorded = clock.reading(), CudaGraphRecordings.reading()
            loop_seconds = run_loop_on(trainer, batches, device)
            row["gc_loop"] = CollectorClock.between(collected, clock.reading())  # one unmeasured step included
            row.update(recorded_between(recorded, CudaGraphRecordings.reading(), "loop"))
        finally:
            gc.callbacks.remove(clock)
        progress(name, f"{len(batches)} loop steps on device batches done", stamps[0])
        row["loop_tokens_per_s"] = round(measured_tokens / loop_seconds, 1)
        row["loop_vs_model"] = round(row["loop_tokens_per_s"] / row["model_tokens_per_s"], 3)
        return row


class DeviceBatches:
    """A prefetcher that hands the trainer batches already on the device, in order (`run_loop_on`)."""

    def __init__(self, batches: list, first_step: int):
        self.batches, self.first_step, self.handed = batches, first_step, 0

    def get(self, step: int):
        self.handed += 1
        return self.batches[step - self.first_step]

    def close(self) -> None:
        pass


def run_loop_on(trainer, batches: list, device: torch.device) -> float:
    """Seconds the trainer's loop (`Pretrainer._train_steps`: the step, result reads, scheduler, logging) takes
    for `batches`, fed from the device instead of the data workers. The parameters keep training (the
    timing does not depend on their values); one step first pays any lazy initialisation."""
    from tqdm.auto import tqdm

    feed = trainer.prefetcher = DeviceBatches([batches[0], *batches], trainer.micro_step)
    trainer.config.train.max_steps = trainer.step + 1
    trainer._train_steps(tqdm(disable=True))
    trainer.config.train.max_steps = trainer.step + len(batches)
    synchronize(device)
    began = time.perf_counter()
    trainer._train_steps(tqdm(disable=True))
    synchronize(device)
    seconds = time.perf_counter() - began
    if feed.handed != len(feed.batches):
        raise RuntimeError(f"the loop took {feed.handed} of the {len(feed.batches)} device batches")
    return seconds


def format_rows(rows: list[dict]) -> str:
    lines = ["| size | routing | prefetch | pixels | step | warm-up s | trainer tokens/s | model tokens/s | trainer / model | "
             "loop / model | GPU busy | "
             "host: batch / copy / forward / backward / update / bookkeeping / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        shares = row.get("host_time_shares")
        split = " / ".join(f"{shares[k]:.2f}" for k in ("batch", "to_device", "forward", "backward", "update",
                                                         "bookkeeping", "other")) if shares else "-"
        busy = "-" if row.get("gpu_busy_share") is None else f"{row['gpu_busy_share']:.2f}"
        step = row.get("compile", "eager") + (", buckets" if row.get("text_padding") == "buckets" else "")
        if row.get("graphs_compiled_while_measured"):
            step += f" ({row['graphs_compiled_while_measured']} graphs compiled while measured)"
        if row.get("cuda_graphs_recorded_while_measured"):
            step += f" ({row['cuda_graphs_recorded_while_measured']} CUDA graphs recorded while measured)"
        lines.append(f"| {row['size']} | {row['routing']} | {row.get('prefetch_worker', '-')} | "
                     f"{row.get('pixel_transport', '-')} | {step} | "
                     f"{row.get('warmup_seconds', float('nan')):.1f} | {row['trainer_tokens_per_s']:,.0f} | "
                     f"{row['model_tokens_per_s']:,.0f} | {row['trainer_vs_model']:.2f} | "
                     f"{row['loop_vs_model']:.2f} | {busy} | {split} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_script_arguments(BenchTrainerArguments, argv, prog="python -m benchmarks.bench_trainer",
                                  description=__doc__)
    if args.warmup < 0 or args.steps < 1 or args.profile_steps < 0 or not 1 <= args.windows <= args.steps:
        raise SystemExit("error: --steps must be >= 1, --warmup and --profile-steps >= 0, --windows from 1 to --steps")
    def names(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    try:
        processes = [int(count) for count in names(args.prefetch_processes)] or [None]  # None: the config's
    except ValueError:
        raise SystemExit(f"error: --prefetch-processes takes whole numbers, got {args.prefetch_processes!r}")
    if processes != [None] and min(processes) < 1:
        raise SystemExit("error: --prefetch-processes must be >= 1")
    from training.tasks import PIXEL_TRANSPORTS

    transports = names(args.pixel_transports) or [None]  # None: the config's
    if any(transport not in (None, *PIXEL_TRANSPORTS) for transport in transports):
        raise SystemExit(f"error: --pixel-transports takes {', '.join(PIXEL_TRANSPORTS)}, got {args.pixel_transports!r}")
    rows = []
    for size, routing, worker, count, transport in itertools.product(
            names(args.sizes), names(args.routings), names(args.prefetch_workers), processes, transports):
        if worker != "process" and count != processes[0]:
            continue  # the number of worker processes means nothing to a thread
        rows.append(measure_variant(args, size, routing, worker, count, transport))
        gc.collect()  # the variant's trainer, model and batches
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
        if args.json:  # after every variant: a run stopped by a time limit keeps what it measured
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"config": args.config, "overrides": args.set, "warmup": args.warmup,
                           "steps": args.steps, "windows": args.windows, "profile_steps": args.profile_steps,
                           "rows": rows}, handle, indent=1)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
