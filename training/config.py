"""The pre-training run configuration: a YAML file of sections, validated field by field.

Every unknown section or field, and every bad value, raises `ConfigError` naming `section.field`.
`--set section.field=value` on the command line overrides a value (parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from modeling_uniperceiver_moe.processing_uniperceiver_moe import IMAGE_PREPROCESSING

from .data import BATCH_TRANSPORTS, PIN_MEMORY_PLACES, PREFETCH_WORKERS, TASK_SAMPLINGS
from .tasks import MLM_CORRUPTIONS, PIXEL_TRANSPORTS, TEXT_PADDINGS


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    cache_dir: str = "data_cache"
    slice: str = "small"  # tiny | small | full (training/build_data.py)
    build: bool = True  # build the slice from the Debian packages if it is missing
    shuffle_block: int = 256  # rows shuffled together (resumable block shuffle)
    on_bad_sample: str = "skip"  # skip | error
    augment: bool = False  # image/video classification inputs in training: random crop and mirror (tasks.augment_frames);
    # measured to cost accuracy within 2,000 steps (docs/results.md), meant for long schedules
    max_text_length: int = 32
    mask_probability: float = 0.15  # MLM: share of the words masked (whole words), in training and evaluation
    mlm_corruption: str = "reference"  # reference: the chosen words become <|spe|>, in training 80% of the time
    # (10% random tokens, 10% unchanged), as the reference | mask_token: always [MASK]
    vocabulary_size: int = 1024  # MLM/caption candidates: the slice's most frequent BPE tokens (and the end token)
    candidate_vocabulary: str = "frequent"  # frequent (vocabulary_size of them: the most frequent tokens) | full
    # (every token of the model's vocabulary, 49,411, as the reference's MLM and caption targets; split them
    # across processes with partition_candidates)
    end_token_candidate: bool = True  # frequent: the end token is one of the vocabulary_size candidates, so a
    # caption's last query learns to answer it and generated captions stop (full holds it anyway)
    word_prior: bool = True  # start the model's word bias (model.word_logit_bias) of the MLM and captioning
    # families at the log-frequencies of their answers in the first training rows (trainer.start_word_bias)
    eval_samples: int = 128  # per task, from the test split
    prefetch: int = 2  # batches built ahead (0 = none: each built when the step needs it)
    text_padding: str = "auto"  # longest (a batch's texts padded to its longest) | buckets (to 8, 16, 32, ...:
    # a few shapes per task, for train.compile; tasks.bucket_length) | auto (buckets when the run compiles,
    # longest otherwise)
    prefetch_worker: str = "process"  # process (a forked DataLoader worker: the decoding does not hold the training
    # loop's interpreter lock) | thread (in the training process)
    pin_memory: str = "thread"  # where a CUDA device's batches are put in page-locked memory (for copies that do
    # not block the loop): thread (a pinning thread beside each worker process, torch DataLoader's) | loop (the
    # training loop, as it takes each batch: no thread beside it wanting the interpreter lock)
    batch_transport: str = "packed"  # how a worker process hands a batch over: packed (its tensors in one buffer,
    # one shared-memory handle; data.PackedBatch) | tensors (each tensor shared on its own)
    prefetch_processes: int = 1  # worker processes under prefetch_worker: process, each building the batches of its
    # share of the tasks (data.share_tasks); more when one worker builds a batch slower than a step takes
    workers: int = 0  # threads decoding/resizing images inside a batch (0 = none; GPUs want ~8)
    partition_candidates: bool = False  # several processes: each encodes its slice of the step's shared candidates
    # (class names, the vocabulary) and the features are gathered, as the reference splits its shared targets
    # across GPUs (model CandidateShard); under task_sampling: per_process every process encodes its slice of
    # every set some process scores in the step
    task_sampling: str = "per_process"  # per_process (the reference: each process draws its own task per step,
    # losses are per-process means, retrieval scores within the process) | shared (one task per step everywhere,
    # losses normalised over the global batch, retrieval against every process's pairs). Equal with one process.
    pixel_transport: str = "auto"  # the training batches' pixels from the data workers to the device: uint8
    # (the resized 8-bit pixels, normalised on the device after the copy: a quarter of the bytes to hand over,
    # pin and copy) | float32 (normalised by the workers) | auto (uint8 when training on a CUDA device). The
    # model sees the same floats either way (tasks.normalise_pixels)
    image_preprocessing: str = "clip"  # clip | reference (ImageNet statistics, the 256/224 crop), see
    # modeling_uniperceiver_moe.processing_uniperceiver_moe.build_image_processor


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.2  # not on norms, biases, embeddings, gates, scales
    eps: float = 1e-8
    grad_clip: float = 0.1  # max grad norm (reference)
    fused: bool | None = None  # torch's fused AdamW; None = on CUDA and CPU (trainer.make_optimizer)
    router_lr_scale: float = 1.0  # the MoE gates' (routers') learning rate as a multiple of lr; 0 keeps them fixed


@dataclass
class TrainConfig:
    max_steps: int = 600  # optimizer steps
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    log_every: int = 10
    eval_every: int = 200
    eval_caption_beam: int = 0  # > 0: the final evaluation also generates every captioning task's captions with
    # beam search of this width and scores BLEU-4 and CIDEr-D (slower than the teacher-forced metrics)
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint of output_dir) | none | a checkpoint path
    resume_with_changes: bool = False  # resume although settings differ from the checkpoint's (the new ones win)
    tracker: str | None = "tensorboard"  # any tracker accelerate supports, or None
    max_minutes: float | None = None  # stop (with a checkpoint) after this wall time
    on_non_finite: str = "stop"  # a step whose gradient norm is not finite is never applied; stop the run, or
    # skip it and go on (stopping after 10 in a row). fp16 always skips: its loss scaler overflows by design
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the weights, gradients and optimizer state over the processes (torch FSDP2,
    # training/sharding.py; GPUs or CPUs) instead of keeping a whole copy in each (data parallelism); eager
    # only (train.compile: false), bf16 or float32
    compile: bool | str = "auto"  # torch.compile the encoder (model.compile_encoder): true | false | auto (on a
    # CUDA device, eager elsewhere). The first steps of each task's shapes compile their graphs (minutes, logged
    # as `compiled_graphs`); a run that fails to compile under auto goes on eagerly for the failing code
    compile_mode: str = "reduce-overhead"  # torch.compile mode: reduce-overhead (CUDA graphs) | default |
    # max-autotune | max-autotune-no-cudagraphs
    compile_layers_per_graph: int = 4  # consecutive layers in one compiled call (model.compile_encoder): 4,
    # three calls for a 12-layer encoder pass (less host time than one a layer: guard checks, graph launches;
    # spans of the same layer kinds share their graphs); 1, each layer (the shortest compilation on the CPU,
    # where the token path breaks its graphs); 0, the whole stack as one graph (no faster, twice the compile)
    compile_shapes: str = "static"  # static (a graph per shape: the fastest kernels; with data.text_padding:
    # buckets the shapes are few) | auto (dynamo's default: a graph for the first shape, then one with the
    # changing sizes symbolic: fewer graphs, about as long to compile) | dynamic (symbolic sizes from the start)


@dataclass
class TaskConfig:
    weight: float = 1.0  # sampling weight
    batch_size: int = 32  # global batch (split across processes)
    loss_weight: float | None = None  # None = the registry's default
    source: dict | None = None  # None = the bundled slice; else {files|hub, format, split, config, columns}


@dataclass
class PretrainConfig:
    output_dir: str = "outputs/pretrain"
    seed: int = 0
    model: dict = field(default_factory=dict)  # UniPerceiverMoEConfig keyword arguments
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


COMPILE_CHOICES = ("auto", True, False)  # train.compile
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SHAPES = {"auto": None, "static": False, "dynamic": True}  # train.compile_shapes -> torch.compile(dynamic=...)


def compiles(config: "PretrainConfig", device_type: str) -> bool:
    """Whether a run on a `device_type` device ("cuda", "cpu", ...) compiles its encoder: `train.compile`, with
    auto meaning on a CUDA device only and not under `train.fsdp` (eager)."""
    setting = config.train.compile
    return device_type == "cuda" and not config.train.fsdp if setting == "auto" else setting


def text_padding(config: "PretrainConfig", compiled: bool) -> str:
    """`data.text_padding` with auto resolved: buckets for a compiled run (a few shapes), longest otherwise."""
    setting = config.data.text_padding
    return ("buckets" if compiled else "longest") if setting == "auto" else setting


def pixel_transport(config: "PretrainConfig", device_type: str) -> str:
    """`data.pixel_transport` with auto resolved: uint8 on a CUDA device (the batches are pinned and copied
    there), float32 elsewhere."""
    setting = config.data.pixel_transport
    return ("uint8" if device_type == "cuda" else "float32") if setting == "auto" else setting


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
CHOICES = {
    ("data", "slice"): ("tiny", "small", "full"),
    ("data", "on_bad_sample"): ("skip", "error"),
    ("data", "image_preprocessing"): IMAGE_PREPROCESSING,
    ("data", "task_sampling"): TASK_SAMPLINGS,
    ("data", "prefetch_worker"): PREFETCH_WORKERS,
    ("data", "pin_memory"): PIN_MEMORY_PLACES,
    ("data", "batch_transport"): BATCH_TRANSPORTS,
    ("data", "text_padding"): TEXT_PADDINGS,
    ("data", "pixel_transport"): ("auto", *PIXEL_TRANSPORTS),
    ("data", "candidate_vocabulary"): ("frequent", "full"),
    ("data", "mlm_corruption"): MLM_CORRUPTIONS,
    ("train", "mixed_precision"): ("no", "bf16", "fp16"),
    ("train", "on_non_finite"): ("stop", "skip"),
    ("train", "compile"): COMPILE_CHOICES,
    ("train", "compile_mode"): COMPILE_MODES,
    ("train", "compile_shapes"): tuple(COMPILE_SHAPES),
}


def flat_settings(config: dict, prefix: str = "") -> dict:
    """`{"optim.lr": 0.001, "tasks.austen_mlm.weight": 1.0, ...}` from a nested config dict (JSON values)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Settings whose absence from a saved config means a value other than today's default: a config written
# without `data.end_token_candidate` trained without the end token among its candidates.
VALUE_WHEN_ABSENT = {"data.end_token_candidate": False}


def changed_settings(saved: dict, requested: dict) -> dict[str, tuple[Any, Any]]:
    """`{setting: (saved value, requested value)}` for every setting that differs between two run configs
    (`PretrainConfig.to_dict()`, or one read back from JSON: tuples compare equal to lists). A data / optim /
    train field that `saved` lacks was added to the code after it was written and is not a change, unless
    its absence means a value that differs (`VALUE_WHEN_ABSENT`); one that `requested` lacks was removed
    from the code (or renamed), which cannot honour it, and is not a change either."""
    saved, requested = (flat_settings(json.loads(json.dumps(c))) for c in (saved, requested))
    saved = {**{key: value for key, value in VALUE_WHEN_ABSENT.items() if key in requested}, **saved}
    return {key: (saved.get(key), requested.get(key)) for key in sorted(set(saved) | set(requested))
            if saved.get(key) != requested.get(key)
            and not ((key not in saved or key not in requested) and key.split(".")[0] in ("data", "optim", "train"))}


def _yaml_11_value(value: Any, default: Any, choices: tuple | None) -> Any:
    """Undo what YAML 1.1 does to values a user means literally: `no`/`off` parsed as false where a word is
    expected (`mixed_precision: no`), and exponents without a dot (`3e-4`) left as strings where a number is."""
    if choices is not None and isinstance(value, bool):
        word = {False: "no", True: "yes"}[value]
        return word if word in choices else value
    if isinstance(default, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Counts that must be at least 1 (0 would divide by zero, evaluate nothing or keep nothing).
AT_LEAST_ONE = {"data.shuffle_block", "data.prefetch_processes", "data.max_text_length", "data.vocabulary_size",
                "data.eval_samples", "train.max_steps", "train.grad_accum", "train.log_every", "train.keep_checkpoints",
                "batch_size"}
# Optional limits that are either null (no limit) or positive: 0 would stop a run before its first step.
POSITIVE_OR_NULL = {"train.max_minutes"}


def _coerce(section: str, name: str, value: Any, default: Any, annotation: str = "") -> Any:
    """Check one field's value against its default's type (or, for a None default, its annotation)."""
    where = f"{section}.{name}" if section else name
    if default is None and value is not None and "float" in annotation:
        default = 0.0  # an optional number: checked as a number when given
    value = _yaml_11_value(value, default, CHOICES.get((section, name)))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if (section, name) in CHOICES and value not in CHOICES[(section, name)]:
        raise ConfigError(f"{where} must be one of {CHOICES[(section, name)]}, got {value!r}")
    if isinstance(default, bool) and not isinstance(value, bool) and value is not None:
        raise ConfigError(f"{where} must be true/false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where} must be >= 0, got {value!r}")
        if value < 1 and (where in AT_LEAST_ONE or name in AT_LEAST_ONE):
            raise ConfigError(f"{where} must be >= 1, got {value!r}")
        if value == 0 and where in POSITIVE_OR_NULL:
            raise ConfigError(f"{where} must be > 0, or null for no limit, got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{where} must be a list of {len(default)} numbers, got {value!r}")
        value = tuple(value)
    return value


def _section(section: str, cls, values: dict | None):
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {values!r}")
    defaults = cls()
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(annotations))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(f'{section}.{u}' for u in unknown)}; known: {sorted(annotations)}")
    return cls(**{k: _coerce(section, k, v, getattr(defaults, k), annotations[k]) for k, v in values.items()})


def parse_config(raw: dict) -> PretrainConfig:
    from .tasks import TASKS

    raw = dict(raw or {})
    top = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known: {sorted(top)}")
    output_dir = raw.get("output_dir", PretrainConfig.output_dir)
    if not isinstance(output_dir, str) or not output_dir.strip():
        raise ConfigError(f"output_dir must be a folder path, got {output_dir!r}")
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"section 'model' must be a mapping of UniPerceiverMoEConfig fields, got {model!r}")
    tasks = raw.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise ConfigError(f"section 'tasks' must be a mapping of task name to settings, got {tasks!r}")
    config = PretrainConfig(
        output_dir=output_dir,
        seed=_coerce("", "seed", raw.get("seed", 0), 0),
        model=dict(model),
        **{name: _section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()},
    )
    if not tasks:
        raise ConfigError(f"tasks: list at least one task; registered: {sorted(TASKS)}")
    for name, values in tasks.items():
        if name not in TASKS:
            raise ConfigError(f"tasks.{name}: unknown task; registered tasks: {sorted(TASKS)}")
        config.tasks[name] = _section(f"tasks.{name}", TaskConfig, values)
    if not 0.0 < config.data.mask_probability < 1.0:
        raise ConfigError(f"data.mask_probability must be in (0, 1), got {config.data.mask_probability}")
    if config.train.fsdp and config.train.mixed_precision == "fp16":
        raise ConfigError("train.fsdp trains in bf16 or float32: fp16's loss scaler is not run over sharded "
                          "gradients here. Set train.mixed_precision to bf16 or no")
    if config.train.fsdp and config.train.compile is True:
        raise ConfigError("train.fsdp runs the encoder eagerly: set train.compile to false (or auto, which "
                          "then stays eager)")
    return config


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.field=value` (value parsed as YAML) into the raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        path, value = item.split("=", 1)
        node = raw
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {key} is not a section")
        node[keys[-1]] = yaml.safe_load(value)
    return raw


DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny_cpu.yaml")


@dataclass
class RunArguments:
    """The command-line options of a pre-training run (`training.pretrain`, `training.baselines`), parsed
    by `modeling_uniperceiver_moe.command_line` like every script's."""

    config: str = field(default=DEFAULT_CONFIG, metadata={"help": "the run config, a YAML file of sections"})
    set: list[str] = field(default_factory=list, metadata={
        "action": "extend", "metavar": "SECTION.FIELD=VALUE",
        "help": "override one config value (the value is read as YAML); repeatable"})
    output_dir: Optional[str] = field(default=None, metadata={"help": "shortcut for --set output_dir=..."})

    def overrides(self) -> list[str]:
        return list(self.set) + ([f"output_dir={self.output_dir}"] if self.output_dir else [])

    def load(self) -> PretrainConfig:
        return load_config(self.config, self.overrides())


def load_config(path: str, overrides: list[str] | None = None) -> PretrainConfig:
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path!r} is not valid YAML: {error}") from None
    return parse_config(apply_overrides(raw, overrides or []))
