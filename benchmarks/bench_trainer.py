"""The trainer's speed beside the model's, measured in one run on the same batches.

    python -m benchmarks.bench_trainer --sizes ti,b --routings none,attribute,token --json out.json        # GPU
    python -m benchmarks.bench_trainer --config training/configs/tiny_cpu.yaml --sizes config \\
        --routings attribute --warmup 2 --steps 4 --profile-steps 2                                      # CPU

For each (size, routing, prefetch worker, number of worker processes, pixel transport, pinning place, batch
transport, layers per compiled graph), one
`Pretrainer` of the config (`--set` overrides as in `training.pretrain`, except the settings the benchmark fixes:
evaluation and checkpoints off, a temporary output folder; `--prefetch-processes 1,3` compares the numbers of
data worker processes, `--pixel-transports uint8,float32,uint8` the pixels handed over as bytes or floats,
`--pin-memory thread,loop` where the batches are pinned, `--batch-transports packed,tensors` a worker's batch
handed over as one buffer or tensor by tensor, `--layers-per-graph 1,4` the encoder compiled layer by layer or
in spans of 4 layers; a repeated value measures the spread between variants
of one process, whose later variants reuse the first one's compiled graphs):

After `--warmup` steps of the trainer's own loop (their seconds: with compilation, its cost), the `--steps`
measured steps run in `--rounds` rounds, each of three phases on the same batches:

1. trainer: steps of the trainer's own loop, batches from its data workers; tokens/s (the tokens each step
   ran through the encoder, candidates included, as the trainer logs them).
2. model: the bare step (forward, loss, backward, clip, AdamW) of the same model and optimizer on the very
   batches those trainer steps took, put on the device beforehand: no data work, no logging, no host
   synchronisation of its own.
3. loop: the trainer's own loop again (its step, the result reads, the scheduler, logging) on those batches
   on the device, so that `trainer / loop` is what the data path costs (waiting for the workers, pinning,
   the copy) and `loop / model` what the loop adds to the bare step.

Rounds interleave the phases, so that the host's speed drifting over a run (a quarter within a minute has
been seen on the GPU machine) does not land in one phase only. Each phase also counts the graphs compiled
(`graphs_compiled_while_measured`: a shape the warm-up did not reach; it should be 0), the CUDA graphs the
compiled layers recorded (`trainer.CudaGraphRecordings`: a step's sequence of compiled calls met for the first
time; until none are, the trainer measures its warm-up, not its speed), and Python's garbage collections with
their seconds (`gc_trainer`, `gc_model`, `gc_loop`).

Then `--profile-steps` more trainer steps under `torch.profiler`: the host time of each region of
`Pretrainer.train_step` (`trainer.STEP_REGIONS`: waiting for the batch, the copy to the device, forward with the
loss, backward, clip and update, bookkeeping) as shares of the wall time, and on a GPU the share of the wall
time its kernels are busy; with `--profile-ops N`, the N operations with the most self host time, and with
`--profile-sites M` each one's M call sites in this repository's code with the most (recording the stacks
slows the profiled steps, so their shares are then not the unprofiled step's).

Prints a table with `trainer / model` and `loop / model` per variant; `--json PATH` writes every row.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import re
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
    pin_memory: str = field(default="", metadata={"help": "data.pin_memory values (thread, loop; a value may "
                                                         "repeat); default: the config's"})
    batch_transports: str = field(default="", metadata={"help": "data.batch_transport values (packed, tensors; a "
                                                                 "value may repeat); default: the config's"})
    layers_per_graph: str = field(default="", metadata={"help": "train.compile_layers_per_graph values (1: each "
                                                                 "layer, 0: the whole stack; a value may repeat); "
                                                                 "default: the config's"})
    warmup: int = field(default=20, metadata={"help": "trainer steps before the measured ones"})
    steps: int = field(default=60, metadata={"help": "measured steps (trainer, then the model on the same batches)"})
    rounds: int = field(default=1, metadata={"help": "rounds the measured steps are split into, each timing the "
                                                     "trainer, the model and the loop on its batches"})
    profile_steps: int = field(default=10, metadata={"help": "profiled trainer steps after the measured ones"})
    profile_ops: int = field(default=0, metadata={"help": "also list the N operations with the most host time "
                                                          "of the profiled steps (trainer regions left out)"})
    profile_sites: int = field(default=0, metadata={"help": "with --profile-ops, also record the profiled steps' "
                                                            "Python stacks and list each operation's N call sites "
                                                            "with the most host time (the stacks slow those steps)"})
    set: list[str] = field(default_factory=list, metadata={"help": "config overrides key=value (repeatable)"})
    json: Optional[str] = field(default=None, metadata={"help": "write the rows here"})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_overrides(args: BenchTrainerArguments, size: str, routing: str, output_dir: str,
                      prefetch_worker: str = "process", prefetch_processes: int | None = None,
                      pixel_transport: str | None = None, pin_memory: str | None = None,
                      batch_transport: str | None = None, layers_per_graph: int | None = None) -> list[str]:
    total = args.warmup + args.steps + args.profile_steps
    overrides = list(args.set) + [f"output_dir={output_dir}", f"train.max_steps={total}", "train.eval_every=0",
                 "train.save_every=0", "train.tracker=null", "train.max_minutes=null", "train.grad_accum=1",
                 f"train.log_every={total}", f"model.moe_routing={routing}", f"data.prefetch_worker={prefetch_worker}"]
    if prefetch_processes is not None:
        overrides.append(f"data.prefetch_processes={prefetch_processes}")
    if pixel_transport is not None:
        overrides.append(f"data.pixel_transport={pixel_transport}")
    if pin_memory is not None:
        overrides.append(f"data.pin_memory={pin_memory}")
    if batch_transport is not None:
        overrides.append(f"data.batch_transport={batch_transport}")
    if layers_per_graph is not None:
        overrides.append(f"train.compile_layers_per_graph={layers_per_graph}")
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

    events = [event for event in profiler.key_averages()
              if event.key not in STEP_REGIONS and not is_python_frame(event.key)]
    events.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return [{"name": event.key, "calls": event.count, "self_host_s": round(event.self_cpu_time_total / 1e6, 4),
             "share": round(event.self_cpu_time_total / 1e6 / wall, 4)} for event in events[:count]]


SITE_DEPTH = 12  # Python frames kept per call stack when grouping operations by where they were called


OUR_PACKAGES = ("modeling_uniperceiver_moe/", "training/", "prompt_tuning/", "benchmarks/")


def call_site(stack: list[str]) -> str:
    """The innermost frame of `stack` (innermost first, as torch.profiler lists it: the file, the line where the
    function starts and its name, e.g. `training/trainer.py(531): train_step`) in this repository's packages,
    else the innermost frame: the function of ours that asked for the operation. A backward operation counts
    under the forward function that made it, or, where the profiler does not link the two, under the
    function that called `backward`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frames = [frame[len(root):] if frame.startswith(root) else frame for frame in stack]
    ours = [frame for frame in frames if frame.startswith(OUR_PACKAGES)]
    return (ours or frames or ["(no Python frame)"])[0]


def is_python_frame(name: str) -> bool:
    """Whether a profiler event is a Python function the stack recording adds (`file.py(12): name`, `<built-in
    ...>`), not an operation."""
    return name.startswith("<built-in") or re.search(r"\.py\(\d+\): ", name) is not None


def operation_sites(profiler, names: list[str], count: int) -> dict[str, list[dict]]:
    """For each operation in `names`, its `count` call sites (`call_site`) with the most self host time in a
    profile recorded `with_stack`: site, calls and self host seconds."""
    sites: dict[str, dict[str, list]] = {name: {} for name in names}
    for event in profiler.key_averages(group_by_stack_n=SITE_DEPTH):
        if event.key in sites:
            entry = sites[event.key].setdefault(call_site(list(event.stack or [])), [0, 0.0])
            entry[0] += event.count
            entry[1] += event.self_cpu_time_total / 1e6
    return {name: [{"site": site, "calls": calls, "self_host_s": round(seconds, 4)}
                   for site, (calls, seconds) in sorted(found.items(), key=lambda item: -item[1][1])[:count]]
            for name, found in sites.items()}


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
                    prefetch_processes: int | None = None, pixel_transport: str | None = None,
                    pin_memory: str | None = None, batch_transport: str | None = None,
                    layers_per_graph: int | None = None) -> dict:
    from training.config import load_config, pixel_transport as resolved_pixel_transport
    from training.trainer import Pretrainer, compiled_graph_count

    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(args.config, variant_overrides(args, size, routing, output_dir, prefetch_worker,
                                                                prefetch_processes, pixel_transport, pin_memory,
                                                                batch_transport, layers_per_graph))
        trainer = Pretrainer(config)
        device = trainer.accelerator.device
        name = f"{size}/{routing}/{prefetch_worker_label(config)}/{resolved_pixel_transport(config, device.type)}" \
               f"/pinned in {config.data.pin_memory}/{config.data.batch_transport}"
        row = {"size": size, "routing": routing, "device": str(device),
               "prefetch_worker": prefetch_worker_label(config),
               "pixel_transport": resolved_pixel_transport(config, device.type), "pin_memory": config.data.pin_memory,
               "batch_transport": config.data.batch_transport,
               "compile": config.train.compile_mode if trainer.compiled else "eager",
               "layers_per_graph": config.train.compile_layers_per_graph if trainer.compiled else None,
               "text_padding": trainer.ctx.text_padding, "steps": args.steps}
        recorder = StepRecorder(trainer, name, args.warmup)
        clock = CollectorClock()
        gc.callbacks.append(clock)
        try:
            row["warmup_seconds"] = round(timed_phase(lambda: run_trainer_steps(trainer, args.warmup), device,
                                                      clock)["seconds"], 2)
            progress(name, f"warm-up done ({args.warmup} steps)", recorder.started)
            graphs_after_warmup = compiled_graph_count()
            rounds = [measure_round(trainer, recorder, count, device, clock, first=index == 0)
                      for index, count in enumerate(round_sizes(args.steps, args.rounds))]
            row["graphs_compiled_while_measured"] = compiled_graph_count() - graphs_after_warmup
            if args.profile_steps:
                row.update(profile_trainer_steps(trainer, args, device, name))
        finally:
            recorder.prefetcher.close()
            gc.callbacks.remove(clock)
        row.update(summarise_rounds(rounds))
        if len(rounds) > 1:
            row["rounds"] = rounds
            for one in rounds:
                print(f"[{name}] steps {one['steps'][0]}-{one['steps'][1]}: trainer {one['trainer_tokens_per_s']:,.0f}, "
                      f"model {one['model_tokens_per_s']:,.0f}, loop {one['loop_tokens_per_s']:,.0f} tokens/s, "
                      f"{one['cuda_graphs_recorded']} CUDA graphs recorded", flush=True)
        return row


class StepRecorder:
    """Keeps each trainer step's result, and the batches the trainer took from its prefetcher since `clear()`
    (the very batches the model step and the loop then run again), and prints the warm-up's progress."""

    def __init__(self, trainer, name: str, warmup: int):
        self.results, self.taken, self.started = [], [], time.perf_counter()
        self.prefetcher = trainer.prefetcher = trainer.start_prefetcher()
        step_once, get_batch, every = trainer.train_step, self.prefetcher.get, max(1, warmup // 8)

        def recorded_step(index: int) -> dict:
            self.results.append(step_once(index))
            if len(self.results) < warmup and len(self.results) % every == 0:  # a long (compiling) warm-up
                progress(name, f"warm-up step {len(self.results)}/{warmup}", self.started)
            return self.results[-1]

        def taking(step: int):
            self.taken.append(get_batch(step))
            return self.taken[-1]

        trainer.train_step, self.prefetcher.get = recorded_step, taking


def run_trainer_steps(trainer, count: int) -> None:
    """`count` more steps of the trainer's own loop (`Pretrainer._train_steps`: the step, the result reads,
    the scheduler, logging), from whatever prefetcher it holds."""
    from tqdm.auto import tqdm

    trainer.config.train.max_steps = trainer.step + count
    trainer._train_steps(tqdm(disable=True))


def timed_phase(run, device: torch.device, clock: CollectorClock) -> dict:
    """Seconds `run()` takes (the device synchronised before and after), with the garbage collections and the
    CUDA graph recordings during it."""
    from training.trainer import CudaGraphRecordings

    collected, recorded = clock.reading(), CudaGraphRecordings.reading()
    synchronize(device)
    began = time.perf_counter()
    run()
    synchronize(device)
    return {"seconds": time.perf_counter() - began, "gc": CollectorClock.between(collected, clock.reading()),
            **recorded_between(recorded, CudaGraphRecordings.reading(), "")}


def round_sizes(steps: int, rounds: int) -> list[int]:
    """`steps` measured steps split over `rounds` rounds as evenly as whole steps allow."""
    return [steps * (index + 1) // rounds - steps * index // rounds for index in range(rounds)]


def measure_round(trainer, recorder: StepRecorder, count: int, device: torch.device, clock: CollectorClock,
                  first: bool) -> dict:
    """One round: `count` trainer steps, then the bare model step and the trainer's loop on the very batches
    those steps took, put on the device beforehand. Interleaving the three in rounds keeps a slow drift of
    the host's speed out of their ratios."""
    from training.trainer import read_step_result

    recorder.taken.clear()
    done = len(recorder.results)
    start = trainer.step
    trainer_phase = timed_phase(lambda: run_trainer_steps(trainer, count), device, clock)
    tokens = sum(read_step_result(result)["tokens"] for result in recorder.results[done:])
    if [batch.task.name for batch in recorder.taken] != [result["task"] for result in recorder.results[done:]]:
        raise RuntimeError(f"the trainer took {len(recorder.taken)} batches for {count} steps, or others than it "
                           f"trained on")
    batches = [batch.to(device) for batch in recorder.taken]
    model_step = bare_model_step(trainer)
    if first:
        model_step(batches[0])  # pays any lazy initialisation outside the timing
    model_phase = timed_phase(lambda: [model_step(batch) for batch in batches], device, clock)
    loop_phase = timed_phase(lambda: run_loop_on(trainer, batches), device, clock)
    phases = {"trainer": trainer_phase, "model": model_phase, "loop": loop_phase}
    measured = {"steps": [start, start + count], "tokens": tokens,
                **{f"{key}_seconds": phase["seconds"] for key, phase in phases.items()},
                **{f"gc_{key}": phase["gc"] for key, phase in phases.items()},
                **{f"cuda_graphs_recorded{'' if key == 'trainer' else '_' + key}": phase["cuda_graphs_recorded"]
                   for key, phase in phases.items()},
                **{f"cuda_graph_recording_s{'' if key == 'trainer' else '_' + key}": phase["cuda_graph_recording_s"]
                   for key, phase in phases.items()}}
    measured.update(speeds(tokens, measured))
    return measured


def speeds(tokens: int, seconds: dict) -> dict:
    """Tokens/s of the three phases and their ratios, from `{trainer,model,loop}_seconds`."""
    rates = {f"{key}_tokens_per_s": round(tokens / seconds[f"{key}_seconds"], 1) for key in ("trainer", "model", "loop")}
    return {**rates, "trainer_vs_model": round(rates["trainer_tokens_per_s"] / rates["model_tokens_per_s"], 3),
            "loop_vs_model": round(rates["loop_tokens_per_s"] / rates["model_tokens_per_s"], 3)}


def summarise_rounds(rounds: list[dict]) -> dict:
    """The rounds together: tokens/s over all of them, and the collections and recordings summed."""
    tokens = sum(one["tokens"] for one in rounds)
    seconds = {key: sum(one[key] for one in rounds) for key in ("trainer_seconds", "model_seconds", "loop_seconds")}
    summary = {"tokens": tokens, **speeds(tokens, seconds)}
    for phase in ("trainer", "model", "loop"):
        gcs = [one[f"gc_{phase}"] for one in rounds]
        summary[f"gc_{phase}"] = {"collections": [sum(g["collections"][k] for g in gcs) for k in range(3)],
                                  "seconds": round(sum(g["seconds"] for g in gcs), 4),
                                  "full_seconds": round(sum(g["full_seconds"] for g in gcs), 4)}
        tail = "_while_measured" if phase == "trainer" else f"_{phase}"
        source = "" if phase == "trainer" else f"_{phase}"
        summary[f"cuda_graphs_recorded{tail}"] = sum(one[f"cuda_graphs_recorded{source}"] for one in rounds)
        summary[f"cuda_graph_recording_s{tail}"] = round(sum(one[f"cuda_graph_recording_s{source}"] for one in rounds), 3)
    return summary


def bare_model_step(trainer):
    """The bare step of the trainer's model and optimizer on a batch already on the device: forward, loss,
    backward, clip, AdamW, with no data work, no logging and no host synchronisation of its own."""
    from training.tasks import task_loss

    config, model, optimizer = trainer.config, trainer.model, trainer.optimizer
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

    return model_step


def profile_trainer_steps(trainer, args: BenchTrainerArguments, device: torch.device, name: str) -> dict:
    """`--profile-steps` more trainer steps under `torch.profiler`: the host time of each of the step's regions
    and the GPU's busy time as shares of their wall time (and with `--profile-ops`, the busiest operations)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    stacks = {"with_stack": True, "experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)} \
        if args.profile_sites else {}  # verbose: each operation keeps its Python stack for `key_averages`
    with torch.profiler.profile(activities=activities, **stacks) as profiler:
        synchronize(device)
        began = time.perf_counter()
        run_trainer_steps(trainer, args.profile_steps)
        synchronize(device)
        wall = time.perf_counter() - began
    shares = profile_shares(profiler, wall, device)
    if args.profile_ops:
        shares["top_host_ops"] = top_host_operations(profiler, wall, args.profile_ops)
        sites = operation_sites(profiler, [op["name"] for op in shares["top_host_ops"]], args.profile_sites) \
            if args.profile_sites else {}
        for op in shares["top_host_ops"]:
            print(f"[{name}] host {op['share']:6.1%} {op['calls']:6d} calls  {op['name']}", flush=True)
            if op["name"] in sites:
                op["sites"] = sites[op["name"]]
                for site in op["sites"]:
                    print(f"[{name}]        {site['calls']:6d} calls  {site['self_host_s']:.4f} s  {site['site']}",
                          flush=True)
    return shares


class DeviceBatches:
    """A prefetcher that hands the trainer batches already on the device, in order (`run_loop_on`)."""

    def __init__(self, batches: list, first_step: int):
        self.batches, self.first_step, self.handed = batches, first_step, 0

    def get(self, step: int):
        self.handed += 1
        return self.batches[step - self.first_step]

    def close(self) -> None:
        pass


def run_loop_on(trainer, batches: list) -> None:
    """The trainer's own loop over `batches`, fed from the device instead of the data workers; the trainer's
    step counters and prefetcher are put back afterwards, so that its data workers go on where they were.
    The parameters keep training (the timing does not depend on their values)."""
    kept = trainer.prefetcher, trainer.step, trainer.micro_step
    feed = trainer.prefetcher = DeviceBatches(batches, trainer.micro_step)
    try:
        run_trainer_steps(trainer, len(batches))
    finally:
        trainer.prefetcher, trainer.step, trainer.micro_step = kept
    if feed.handed != len(batches):
        raise RuntimeError(f"the loop took {feed.handed} of the {len(batches)} device batches")


def format_rows(rows: list[dict]) -> str:
    lines = ["| size | routing | prefetch (batches) | pixels | pinned in | step | warm-up s | trainer tokens/s | model tokens/s | trainer / model | "
             "loop / model | GPU busy | "
             "host: batch / copy / forward / backward / update / bookkeeping / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        shares = row.get("host_time_shares")
        split = " / ".join(f"{shares[k]:.2f}" for k in ("batch", "to_device", "forward", "backward", "update",
                                                         "bookkeeping", "other")) if shares else "-"
        busy = "-" if row.get("gpu_busy_share") is None else f"{row['gpu_busy_share']:.2f}"
        step = row.get("compile", "eager") + {None: "", 0: ", whole stack", 1: ", per layer"}.get(
            row.get("layers_per_graph"), f", {row.get('layers_per_graph')} layers a graph")
        step += ", buckets" if row.get("text_padding") == "buckets" else ""
        if row.get("graphs_compiled_while_measured"):
            step += f" ({row['graphs_compiled_while_measured']} graphs compiled while measured)"
        if row.get("cuda_graphs_recorded_while_measured"):
            step += f" ({row['cuda_graphs_recorded_while_measured']} CUDA graphs recorded while measured)"
        ratios = {key: f"{row[key]:.2f}" for key in ("trainer_vs_model", "loop_vs_model")}
        for key in ratios if row.get("rounds") else ():  # the spread over the rounds
            each = [one[key] for one in row["rounds"]]
            ratios[key] += f" ({min(each):.2f}-{max(each):.2f})"
        lines.append(f"| {row['size']} | {row['routing']} | {row.get('prefetch_worker', '-')} "
                     f"({row.get('batch_transport', '-')}) | "
                     f"{row.get('pixel_transport', '-')} | {row.get('pin_memory', '-')} | {step} | "
                     f"{row.get('warmup_seconds', float('nan')):.1f} | {row['trainer_tokens_per_s']:,.0f} | "
                     f"{row['model_tokens_per_s']:,.0f} | {ratios['trainer_vs_model']} | "
                     f"{ratios['loop_vs_model']} | {busy} | {split} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_script_arguments(BenchTrainerArguments, argv, prog="python -m benchmarks.bench_trainer",
                                  description=__doc__)
    if args.warmup < 0 or args.steps < 1 or args.profile_steps < 0 or not 1 <= args.rounds <= args.steps:
        raise SystemExit("error: --steps must be >= 1, --warmup and --profile-steps >= 0, --rounds from 1 to --steps")
    if args.profile_sites < 0 or (args.profile_sites and not args.profile_ops):
        raise SystemExit("error: --profile-sites lists the call sites of --profile-ops's operations: give both, >= 1")
    def names(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    def counts(option: str, text: str, least: int, meaning: str = "") -> list[int | None]:
        """A comma list of whole numbers >= least; [None] (the config's value) when empty."""
        try:
            values = [int(count) for count in names(text)] or [None]
        except ValueError:
            raise SystemExit(f"error: --{option} takes whole numbers, got {text!r}")
        if values != [None] and min(values) < least:
            raise SystemExit(f"error: --{option} must be >= {least}{meaning}")
        return values

    processes = counts("prefetch-processes", args.prefetch_processes, 1)
    from training.tasks import PIXEL_TRANSPORTS

    from training.data import BATCH_TRANSPORTS, PIN_MEMORY_PLACES

    transports = names(args.pixel_transports) or [None]  # None: the config's
    if any(transport not in (None, *PIXEL_TRANSPORTS) for transport in transports):
        raise SystemExit(f"error: --pixel-transports takes {', '.join(PIXEL_TRANSPORTS)}, got {args.pixel_transports!r}")
    pinning = names(args.pin_memory) or [None]
    if any(place not in (None, *PIN_MEMORY_PLACES) for place in pinning):
        raise SystemExit(f"error: --pin-memory takes {', '.join(PIN_MEMORY_PLACES)}, got {args.pin_memory!r}")
    handovers = names(args.batch_transports) or [None]
    if any(handover not in (None, *BATCH_TRANSPORTS) for handover in handovers):
        raise SystemExit(f"error: --batch-transports takes {', '.join(BATCH_TRANSPORTS)}, got {args.batch_transports!r}")
    spans = counts("layers-per-graph", args.layers_per_graph, 0, " (0: the whole stack)")
    rows = []
    for size, routing, worker, count, transport, place, handover, span in itertools.product(
            names(args.sizes), names(args.routings), names(args.prefetch_workers), processes, transports, pinning,
            handovers, spans):
        if worker != "process" and (count != processes[0] or handover != handovers[0]):
            continue  # the number of worker processes and the handover mean nothing to a thread
        rows.append(measure_variant(args, size, routing, worker, count, transport, place, handover, span))
        gc.collect()  # the variant's trainer, model and batches
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
        if args.json:  # after every variant: a run stopped by a time limit keeps what it measured
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"config": args.config, "overrides": args.set, "warmup": args.warmup,
                           "steps": args.steps, "rounds": args.rounds, "profile_steps": args.profile_steps,
                           "rows": rows}, handle, indent=1)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
