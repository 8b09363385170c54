"""What a pre-training checkpoint holds, and the checks made before a run resumes from one.

A checkpoint is `<output_dir>/checkpoints/step_<N>/`:

| file | written by | loaded with |
|---|---|---|
| `model.safetensors` | accelerate `save_state`; under `train.fsdp` process 0 (training/sharding.py) | safetensors |
| `optimizer.bin`, `scaler.pt` (fp16) | the same (fp16 not under `train.fsdp`) | `torch.load(weights_only=True)` |
| `random_states_<rank>.pkl` | accelerate `save_state` | `torch.load(weights_only=True)` |
| `data_state_<rank>.json` | each process: its loader position | json |
| `trainer_state.json` | step, number of processes, run config, length of `metrics.jsonl` | json |
| `checksums.json` | sha256 of every other file | json |

No file is unpickled with code execution: the learning-rate schedule is rebuilt from the step
(`restore_schedule`) instead of being pickled, and a `custom_checkpoint_*.pkl` (what accelerate would
unpickle unsafely) is refused. `verify_checkpoint` runs before anything is loaded: it names a missing or
corrupt file and the newest earlier checkpoint that verifies, and warns when the random-number state cannot
be restored (the run would continue, but not bit-for-bit like an uninterrupted one).
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from accelerate.utils.constants import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME

from .build_data import sha256_file
from .config import changed_settings

CHECKPOINT_PREFIX = "step_"
CHECKSUMS = "checksums.json"
TRAINER_STATE = "trainer_state.json"
WEIGHTS_FILE = SAFE_WEIGHTS_NAME  # "model.safetensors", the names accelerate's save_state gives its files
OPTIMIZER_FILE = f"{OPTIMIZER_NAME}.bin"  # "optimizer.bin"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: the message names the checkpoint, the file and what to do instead."""


# --------------------------------------------------------------------------------------------- where
def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints of a run (those with a trainer state), oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [os.path.join(root, d) for d in os.listdir(root)
             if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()
             and os.path.exists(os.path.join(root, d, TRAINER_STATE))]
    return sorted(found, key=lambda p: int(os.path.basename(p)[len(CHECKPOINT_PREFIX):]))


# What a run writes into its output_dir (pretrain and training.baselines); starting over moves these aside.
RUN_ARTEFACTS = ("checkpoints", "final", "logs", "metrics.jsonl", "report.json", "report.md", "loss_curves.png",
                 "baselines")


def set_aside_previous_run(output_dir: str) -> str | None:
    """Move an earlier run's artefacts in `output_dir` into `output_dir/previous-run-<n>/` (the first free n)
    so that a run started over never mixes with it; returns that folder, or None when there was no run."""
    found = [name for name in RUN_ARTEFACTS if os.path.exists(os.path.join(output_dir, name))]
    if not found:
        return None
    n = 1
    while os.path.exists(os.path.join(output_dir, f"previous-run-{n}")):
        n += 1
    target = os.path.join(output_dir, f"previous-run-{n}")
    os.makedirs(target)
    for name in found:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


# --------------------------------------------------------------------------------------------- what may change
# Settings a resumed run may change without train.resume_with_changes: how long it runs, how it reports,
# where it reads from and how it computes the same function (compilation, padding), not what it trains.
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.log_every", "train.eval_every", "train.eval_caption_beam",
                     "train.save_every", "train.keep_checkpoints", "train.resume", "train.resume_with_changes",
                     "train.tracker", "train.max_minutes", "train.on_non_finite", "train.compile", "train.compile_mode",
                     "train.compile_layers_per_graph", "data.prefetch", "data.prefetch_worker", "data.pin_memory",
                     "data.batch_transport", "data.prefetch_processes", "data.workers", "data.pixel_transport",
                     "data.text_padding", "data.eval_samples", "data.build", "data.cache_dir")


def config_changes(saved: dict, requested: dict) -> list[str]:
    """`setting: checkpoint value -> requested value` for every setting that differs between a checkpoint's
    config and the requested one (`config.changed_settings`), except those in RESUMABLE_CHANGES."""
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed_settings(saved, requested).items()
            if key not in RESUMABLE_CHANGES]


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put `scheduler` where it is after `step` optimizer steps: a LambdaLR's state is a pure function of the
    step, so checkpoints store no scheduler file (nothing to unpickle on resume)."""
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler.last_epoch = step
    scheduler._last_lr = rates  # what get_last_lr() returns


# --------------------------------------------------------------------------------------------- integrity
def write_checksums(folder: str) -> None:
    """Record the sha256 of every file in a (staging) checkpoint folder in `checksums.json`."""
    sums = {}
    for directory, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, folder)
            if relative != CHECKSUMS:
                sums[relative] = sha256_file(path)
    with open(os.path.join(folder, CHECKSUMS), "w") as handle:
        json.dump(dict(sorted(sums.items())), handle, indent=0)


def checksum_problems(folder: str) -> dict[str, str] | None:
    """`{file: "is missing" | "does not match its checksum"}` for the files `checksums.json` lists;
    None when the checkpoint has no (readable) checksums."""
    try:
        with open(os.path.join(folder, CHECKSUMS)) as handle:
            sums = json.load(handle)
    except (OSError, ValueError):
        return None
    problems = {}
    for relative, digest in sums.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            problems[relative] = "is missing"
        elif sha256_file(path) != digest:
            problems[relative] = "does not match its checksum (corrupt or truncated)"
    return problems


def is_rng_file(relative: str) -> bool:
    return relative.startswith("random_states_")


def previous_good_checkpoint(path: str) -> str | None:
    """The newest checkpoint of the same run older than `path` whose files all match their checksums."""
    output_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    older = [p for p in list_checkpoints(output_dir) if os.path.abspath(p) != os.path.abspath(path)
             and int(os.path.basename(p)[len(CHECKPOINT_PREFIX):]) < int(os.path.basename(path)[len(CHECKPOINT_PREFIX):])]
    for candidate in reversed(older):
        if checksum_problems(candidate) == {}:
            return candidate
    return None


def unusable(path: str, what: str) -> CheckpointError:
    """A CheckpointError for `path` saying `what` is wrong, and where to resume from instead."""
    fallback = previous_good_checkpoint(path) if os.path.basename(path).startswith(CHECKPOINT_PREFIX) else None
    instead = (f"resume from the previous checkpoint with --set train.resume={fallback} (or delete {path})"
               if fallback else f"delete {path} or start over with --set train.resume=none")
    return CheckpointError(f"checkpoint {path} cannot be used: {what}. {instead}")


def verify_checkpoint(path: str, process_index: int, model_shapes: dict[str, tuple]) -> None:
    """Check a checkpoint before loading it: every file matches `checksums.json`, the files this process
    needs are there, and the weights have this model's names and shapes. Raises CheckpointError naming the
    file; warns (and continues) when only the random-number state of this process is missing or corrupt."""
    problems = checksum_problems(path)
    if problems is None:
        warnings.warn(f"checkpoint {path} has no {CHECKSUMS} (written by an older version): its files cannot be "
                      f"verified before loading", stacklevel=2)
        problems = {}
    rng = f"random_states_{process_index}.pkl"
    if not os.path.isfile(os.path.join(path, rng)):
        problems.setdefault(rng, "is missing")
    for relative, problem in problems.items():
        if not is_rng_file(relative):
            raise unusable(path, f"{relative} {problem}")
    needed = [WEIGHTS_FILE, OPTIMIZER_FILE, f"data_state_{process_index}.json"]
    for name in needed:
        if not os.path.isfile(os.path.join(path, name)):
            raise unusable(path, f"{name} is missing")
    check_weight_shapes(path, model_shapes)
    if rng in problems:
        warnings.warn(f"WARNING: {rng} of checkpoint {path} {problems[rng]}: resuming without restoring the "
                      f"random-number state, so dropout, router noise and augmentation draws will differ from "
                      f"an uninterrupted run", stacklevel=2)


def check_weight_shapes(path: str, model_shapes: dict[str, tuple]) -> None:
    """Raise CheckpointError when `model.safetensors` lacks, adds or reshapes a tensor of the model."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # a header safetensors cannot parse
        raise unusable(path, f"model.safetensors cannot be read ({type(error).__name__}: {error})") from None
    differences = [f"{key}: checkpoint {stored[key]} vs model {shape}" for key, shape in model_shapes.items()
                   if key in stored and stored[key] != tuple(shape)]
    differences += [f"{key}: not in the checkpoint" for key in model_shapes if key not in stored]
    differences += [f"{key}: not in the model" for key in stored if key not in model_shapes]
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise unusable(path, f"model.safetensors does not fit this model ({shown})")


def first_unreadable_file(path: str, process_index: int) -> str | None:
    """Which file of a checkpoint fails to load on its own (safely: safetensors, or torch.load with
    weights_only), when loading the whole checkpoint failed; None when each loads."""
    from accelerate.utils import load as load_weights_only
    from safetensors.torch import load_file

    for name in (WEIGHTS_FILE, OPTIMIZER_FILE, "scaler.pt", f"random_states_{process_index}.pkl"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            load_file(file) if name.endswith(".safetensors") else load_weights_only(file, map_location="cpu")
        except Exception as error:
            return f"{name} ({type(error).__name__}: {str(error)[:200]})"
    return None

