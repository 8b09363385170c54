"""Multi-task pre-training on Accelerate.

One task per step (drawn by weight), bf16/fp16 autocast, gradient accumulation, grad-norm clipping,
AdamW without weight decay on norms/biases/embeddings/gates/scales, warmup + cosine, per-task loss
weights, periodic per-task evaluation, tqdm, tracker logs (TensorBoard by default) plus `metrics.jsonl`,
`save_state` checkpoints with each process's data position (exact resumption), and `save_pretrained` of
the final model with its processor and a report. Data parallelism through accelerate, or the model sharded
over the processes (`train.fsdp`, training/sharding.py).

Checkpoints: `<output_dir>/checkpoints/step_<N>/` (training/checkpoints.py lists the files), written to a
temporary folder and renamed when complete, so a crash never leaves a half-written checkpoint that
`resume: auto` would pick; each carries the sha256 of its files, checked before a resume.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from modeling_uniperceiver_moe import UniPerceiverMoEConfig, UniPerceiverMoEForGenericPerception, UniPerceiverMoEProcessor
from modeling_uniperceiver_moe.modeling_uniperceiver_moe import CandidateShard

from .checkpoints import (CHECKPOINT_PREFIX, TRAINER_STATE, CheckpointError, config_changes, first_unreadable_file,
                          list_checkpoints, restore_schedule, set_aside_previous_run, unusable, verify_checkpoint,
                          write_checksums)
from .config import COMPILE_SHAPES, ConfigError, PretrainConfig, compiles, pixel_transport, text_padding
from .data import EmptyDatasetError, MultiTaskLoader, StreamSpec, TaskEntry, TaskStream, read_rows, start_prefetcher
from .report import peak_memory_gib, write_report
from .sharding import full_model_state, load_training_state, local_value, save_training_state, shard_model
from .evaluation import BASELINE_TRAIN_ROWS, answer_counts, caption_generation_scores, evaluate_all, trivial_baseline
from .tasks import (SHARED_CANDIDATE_FAMILIES, TaskContext, candidate_inputs, frequent_candidates, gather_rows,
                    get_task, stored_token_id_tasks, task_label_names, task_loss)

logger = logging.getLogger(__name__)
MAX_SKIPPED_IN_A_ROW = 10  # train.on_non_finite=skip (and fp16) stops after this many non-finite steps in a row
NO_DECAY_KEYWORDS = ("norm", "bias", "embedding", "gate", "router", "scale", "log_scale")


# --------------------------------------------------------------------------------------------- pieces
def build_model_config(config: PretrainConfig) -> UniPerceiverMoEConfig:
    accepted = set(inspect.signature(UniPerceiverMoEConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(config.model) - accepted)
    if unknown:
        raise ConfigError(f"model: unknown UniPerceiverMoEConfig field(s) {unknown}")
    try:
        model_config = UniPerceiverMoEConfig(**config.model)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model: {error}") from None
    check_model_fits_tasks(config, model_config)
    return model_config


def check_model_fits_tasks(config: PretrainConfig, model_config: UniPerceiverMoEConfig) -> None:
    """Cross-field checks between the model and what the tasks feed it, before any work starts: text no longer
    than the learned positions, attribute vectors as wide as the model's router expects, task ids in range."""
    from dataclasses import fields

    from modeling_uniperceiver_moe.routing import TokenAttributes

    if config.data.max_text_length > model_config.max_position_embeddings:
        raise ConfigError(f"data.max_text_length={config.data.max_text_length} exceeds model.max_position_embeddings="
                          f"{model_config.max_position_embeddings}: lower the first or raise the second")
    width = len(fields(TokenAttributes))
    if model_config.moe_routing == "attribute" and model_config.attribute_dim != width:
        raise ConfigError(f"model.attribute_dim={model_config.attribute_dim}, but the tasks' token attributes have "
                          f"{width} entries (training/tasks.py ATTRIBUTES): set model.attribute_dim={width}")
    if model_config.moe_routing == "task":
        top = max(get_task(name).task_id for name in config.tasks)
        if top >= model_config.num_tasks:
            raise ConfigError(f"model.num_tasks={model_config.num_tasks} is too small for task id {top} of this task set: "
                              f"set model.num_tasks >= {top + 1}")


def is_router_parameter(name: str) -> bool:
    """A parameter of an MoE layer's gate (`<layer>.<attn|ffn>_gate.router.<...>`)."""
    return ".router." in name


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                     router_lr_scale: float = 1.0) -> list[dict]:
    """Decay only matrices of linear/expert/conv weights; never norms, biases, embeddings, gates, scales. With
    `router_lr_scale` != 1 the MoE gates' parameters (a model that has some) form a third group (no decay) at
    `lr * router_lr_scale`; every group starts at its own learning rate, which the schedule then scales."""
    decay, no_decay, routers = [], [], []
    split_routers = router_lr_scale != 1.0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lowered = name.lower()
        if split_routers and is_router_parameter(name):
            routers.append(parameter)
        elif parameter.ndim < 2 or any(k in lowered for k in NO_DECAY_KEYWORDS):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if routers:
        groups.append({"params": routers, "weight_decay": 0.0, "lr": lr * router_lr_scale})
    return groups


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def make_optimizer(model: torch.nn.Module, optim, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` (`optim.router_lr_scale`: the gates' learning rate). `optim.fused` None
    picks torch's fused AdamW (one pass over each parameter, its gradient and both moments) on the devices it
    serves, CUDA and CPU; on the main job's CPU model it steps several times faster than the multi-tensor one
    (`python -m benchmarks.bench_optimizer`)."""
    fused = optim.fused if optim.fused is not None else device.type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(parameter_groups(model, optim.weight_decay, optim.lr, optim.router_lr_scale),
                             lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused)


def cosine_with_warmup(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak over `warmup` steps, then a half cosine down to `min_ratio` of it at `total`.

    transformers' `get_cosine_with_min_lr_schedule_with_warmup` is the same curve shifted by one warmup step:
    its first update runs at learning rate 0. Here update s of the warmup runs at (s + 1) / warmup of the peak,
    so no update is wasted."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


STEP_REGIONS = ("trainer/batch", "trainer/to_device", "trainer/forward", "trainer/backward", "trainer/update",
                "trainer/bookkeeping")


RESULT_LAG = 2  # micro-steps after a step that the host reads its losses and flags (their copy done by then)


def compiled_graph_count() -> int:
    """How many graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CudaGraphRecordings:
    """The CUDA graphs torch.compile's reduce-overhead mode has recorded in this process, and the seconds the
    recordings took, counted from `count()` on (torch.compile's compilation callbacks).

    A compiled function records a graph the first times a step calls it along a new path: cudagraph trees keep
    one graph per sequence of compiled calls and shapes within a step, so a task's batch with a new
    combination of text lengths records new graphs (the whole sequence's, after one eager run of it) although
    nothing compiles. Until every combination the tasks produce has been seen, such steps run slower."""

    recorded, seconds = 0, 0.0
    _began: float | None = None
    _counting = False

    @classmethod
    def count(cls) -> bool:
        """Start counting (once per process); False where this torch has no recording callbacks."""
        if cls._counting:
            return True
        try:
            from torch._dynamo.callback import CallbackTrigger, callback_handler
        except ImportError:
            return False
        if not hasattr(CallbackTrigger, "CUDAGRAPH_RECORDING"):
            return False

        def started(args) -> None:
            if args.callback_trigger == CallbackTrigger.CUDAGRAPH_RECORDING:
                cls._began = time.perf_counter()

        def ended(args) -> None:
            if args.callback_trigger == CallbackTrigger.CUDAGRAPH_RECORDING and cls._began is not None:
                cls.recorded += 1
                cls.seconds += time.perf_counter() - cls._began
                cls._began = None

        callback_handler.register_start_callback(started)
        callback_handler.register_end_callback(ended)
        cls._counting = True
        return True

    @classmethod
    def reading(cls) -> tuple[int, float]:
        """(graphs recorded, seconds recording) so far."""
        return cls.recorded, cls.seconds


COMPILED_GRAPH_LIMIT = 1024  # graphs torch.compile may build per compiled function (dynamo's limit, raised)


def step_tokens(batch, output) -> torch.Tensor:
    """`[]` tokens a step ran through the encoder: the input sequences and (each with its SPE) the candidates.
    A device tensor, sent to the host with the step's other results (`send_step_result`)."""
    tokens = output.input_outputs.sequence_mask.sum()
    if "target_attention_mask" in batch.inputs:
        mask = batch.inputs["target_attention_mask"]
        tokens = tokens + mask.sum() + mask.shape[0]
    return tokens


STEP_RESULT_VALUES = ("loss", "aux_loss", "tokens", "grad_norm", "skipped")  # a step's results the host reads


def send_step_result(result: dict) -> dict:
    """Starts a `Pretrainer.train_step` result's way to the host as the step's last work: its device tensors
    (`STEP_RESULT_VALUES`) packed into one `[n]` float32 vector and, on a CUDA device, copied without blocking
    into page-locked memory, an event recorded after the copy. The result keeps the vector (key `"sent"`) in
    place of the tensors. Reading it steps later (`read_step_result`) waits for this step's work alone; packing
    at the read would queue the pack behind every step launched since and wait for all of them."""
    names = tuple(key for key in STEP_RESULT_VALUES if torch.is_tensor(result.get(key)))
    if not names:
        return dict(result)
    packed = torch.stack([result[key].detach().float().reshape(()) for key in names])
    event = None
    if packed.device.type == "cuda":
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        packed = host
    kept = {key: value for key, value in result.items() if key not in names}
    return dict(kept, sent=(names, packed, event))


def read_step_result(result: dict) -> dict:
    """A result of `send_step_result` with its values as Python numbers (waiting for that step's copy only)."""
    read = {key: value for key, value in result.items() if key != "sent"}
    if "sent" in result:
        names, packed, event = result["sent"]
        if event is not None:
            event.synchronize()
        read.update(zip(names, packed.tolist()))
    read["tokens"] = int(read["tokens"])
    read["skipped"] = bool(read["skipped"])
    return read


class NonFiniteTraining(RuntimeError):
    """A step produced a non-finite loss or gradient norm; training stopped before applying it."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped training; the message names the checkpoint a rerun continues from."""


class LaunchMismatch(RuntimeError):
    """The launcher started more processes than accelerate joined into one run."""


def check_world_size(joined: int, device_type: str) -> None:
    """Refuse a launch whose processes did not join one run: `accelerate launch --multi_gpu` on a machine
    without GPUs starts WORLD_SIZE processes that each train alone, writing the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != joined:
        hint = (" On a machine without GPUs launch N CPU processes with `ACCELERATE_USE_CPU=1 accelerate launch "
                "--multi_gpu --num_processes N -m training.pretrain ...`" if device_type == "cpu" else "")
        raise LaunchMismatch(f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate "
                             f"joined {joined} into this run, so each would train alone.{hint}")


def check_sharding(distributed_type, fsdp: bool, num_processes: int) -> None:
    """Refuse an FSDP launch that accelerate runs as plain data parallelism: its FSDP serves GPUs only, so
    CPU processes (`ACCELERATE_USE_CPU=1` with `ACCELERATE_USE_FSDP=true`) would each hold the whole model
    and optimizer, the memory FSDP was asked to save; the trainer's own `train.fsdp` shards on CPUs too.
    Refuse `train.fsdp` in a single process, which has nothing to shard over."""
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and distributed_type != DistributedType.FSDP:
        raise LaunchMismatch(f"FSDP was asked for (ACCELERATE_USE_FSDP=true), but accelerate runs this launch as "
                             f"{distributed_type.value}, each process holding the whole model: accelerate's FSDP "
                             f"needs GPUs. Drop --use_fsdp / ACCELERATE_USE_FSDP for data parallelism, or set "
                             f"train.fsdp=true (the trainer's own sharding, on GPUs or CPUs)")
    if fsdp and num_processes < 2:
        raise LaunchMismatch("train.fsdp shards the model over the processes of a launch, and this run has one: "
                             "start it with accelerate launch --num_processes N (or torchrun --nproc_per_node N; "
                             "on CPUs with ACCELERATE_USE_CPU=1), N >= 2, or set train.fsdp=false")


def slice_manifest(config: PretrainConfig, is_main: bool) -> tuple[str, dict]:
    from .build_data import MANIFEST, build_slice, slice_is_complete, verify_slice
    from .data_sources import SOURCES

    directory = os.path.join(config.data.cache_dir, config.data.slice)
    needed = sorted({get_task(n).source for n, t in config.tasks.items() if t.source is None})
    for name, task_config in config.tasks.items():
        if task_config.source is None and get_task(name).source not in SOURCES:
            raise ConfigError(f"task {name!r} reads {get_task(name).source!r} rows, which no data slice bundles: "
                              f"give them as tasks.{name}.source (files or a Hub dataset with a column mapping, "
                              f"docs/training.md)")
    if needed and not slice_is_complete(directory, needed):
        if not config.data.build:
            raise FileNotFoundError(f"data slice {directory} is missing sources {needed}: run "
                                    f"`python -m training.build_data --slice {config.data.slice}` or set data.build: true")
        if is_main:
            build_slice(config.data.slice, config.data.cache_dir, None)
    with open(os.path.join(directory, MANIFEST)) as handle:
        manifest = json.load(handle)
    verify_slice(directory, manifest, needed)
    return directory, manifest


def task_stream_spec(name: str, task_config, directory: str, manifest: dict, split: str) -> StreamSpec:
    if task_config.source is not None:
        source = dict(task_config.source)
        if split == "test":
            source = dict(source, **source.pop("eval", {}))
        else:
            source.pop("eval", None)
        allowed = {"files", "format", "hub", "config", "split", "columns"}
        unknown = sorted(set(source) - allowed)
        if unknown:
            raise ConfigError(f"tasks.{name}.source: unknown field(s) {unknown}; known: {sorted(allowed)}")
        if isinstance(source.get("files"), str):
            import glob

            source["files"] = sorted(glob.glob(source["files"]))
            if not source["files"]:
                raise ConfigError(f"tasks.{name}.source.files matches no file")
        return StreamSpec(**source)
    source = get_task(name).source
    info = manifest["sources"][source]["splits"][split]
    return StreamSpec(files=[os.path.join(directory, f["path"]) for f in info["files"]])


# --------------------------------------------------------------------------------------------- trainer
class Pretrainer:
    """Builds everything from a `PretrainConfig` and runs `train()`; see the module docstring."""

    def __init__(self, config: PretrainConfig):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = config
        tracker = config.train.tracker
        if tracker == "tensorboard":
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                logger.warning("tensorboard is not installed: logging to metrics.jsonl only")
                tracker = None
        self.tracker = tracker
        self.accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            gradient_accumulation_steps=config.train.grad_accum,
            log_with=tracker,
            project_config=ProjectConfiguration(project_dir=config.output_dir,
                                                logging_dir=os.path.join(config.output_dir, "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        check_world_size(acc.num_processes, acc.device.type)
        check_sharding(acc.distributed_type, config.train.fsdp, acc.num_processes)
        set_seed(config.seed)  # identical initial weights in every process
        self.model_config = build_model_config(config)
        self.compiled = compiles(config, acc.device.type)  # train.compile, auto resolved for this device
        with acc.main_process_first():
            self.data_dir, self.manifest = slice_manifest(config, acc.is_main_process)
        self.processor = UniPerceiverMoEProcessor.build(image_size=self.model_config.image_size,
                                                        image_preprocessing=config.data.image_preprocessing,
                                                        add_bos_token=self.model_config.bos_token_id is not None)
        self.tasks = {name: get_task(name) for name in config.tasks}
        self.ctx = self._task_context()
        self.loader = self.build_loader()

        model = UniPerceiverMoEForGenericPerception(self.model_config)
        model.check_input_values = False  # build_batch puts query positions and labels in range; the checks
        # would make the host wait for the GPU at every step
        if config.data.word_prior and model.word_bias is not None:
            self.start_word_bias(model)
        if config.train.gradient_checkpointing:
            model.checkpoint_activations()
        if self.compiled:
            # one graph per (batch shape, train/eval) of each task, times the two layer kinds when compiled per
            # layer: more than dynamo's default of 64 for gpu_b.yaml's nine tasks (reached during a Ti warm-up,
            # docs/benchmarks.md). Past the limit dynamo silently runs new shapes eagerly.
            for limit in ("recompile_limit", "accumulated_recompile_limit"):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), COMPILED_GRAPH_LIMIT))
            if config.train.compile == "auto":  # a graph that fails to compile runs eagerly (with a warning)
                torch._dynamo.config.suppress_errors = True
            model.compile_encoder(layers_per_graph=config.train.compile_layers_per_graph or None,
                                  mode=config.train.compile_mode,
                                  dynamic=COMPILE_SHAPES[config.train.compile_shapes])
            CudaGraphRecordings.count()
        self.sharded = config.train.fsdp
        if self.sharded:  # the optimizer is made over the shards; accelerate prepares neither (it would wrap
            # the model for data parallelism and save only process 0's optimizer shards): training/sharding.py
            model = shard_model(model.to(acc.device), acc.device.type, acc.num_processes)
        optimizer = make_optimizer(model, config.optim, acc.device)
        # The scheduler is stepped by hand once per optimizer step (not prepared: accelerate would step it
        # once per process). It is not checkpointed: resume() rebuilds it from the step (restore_schedule),
        # so no pickled scheduler state is ever loaded.
        self.scheduler = cosine_with_warmup(optimizer, config.train.warmup_steps, config.train.max_steps,
                                            config.train.min_lr_ratio)
        self.model, self.optimizer = (model, optimizer) if self.sharded else acc.prepare(model, optimizer)
        self.candidate_shard, self._candidate_sets = None, {}
        if config.data.partition_candidates and acc.num_processes > 1:
            self.candidate_shard = CandidateShard(acc.process_index, acc.num_processes, gather_rows)
        self.step = 0  # optimizer steps done
        self.micro_step = 0
        self.data_state = None  # loader position after the last consumed batch
        self.history: list[dict] = []

    def build_loader(self) -> MultiTaskLoader:
        """This process's training batches from the first step on (`MultiTaskLoader.batch(step)`)."""
        config, acc = self.config, self.accelerator
        entries = []
        for name, task_config in config.tasks.items():
            spec = task_stream_spec(name, task_config, self.data_dir, self.manifest, "train")
            stream = TaskStream(name, spec, config.seed, config.data.shuffle_block, acc.process_index, acc.num_processes)
            entries.append(TaskEntry(self.tasks[name], task_config.weight, task_config.batch_size, stream))
        ctx = replace(self.ctx, pixel_transport=pixel_transport(config, acc.device.type))  # evaluation keeps floats
        return MultiTaskLoader(entries, ctx, config.seed, acc.num_processes, config.data.on_bad_sample,
                               augment=config.data.augment, rank=acc.process_index,
                               task_sampling=config.data.task_sampling)

    def candidate_vocabulary(self) -> torch.Tensor:
        """`[K]` token ids of the MLM and caption candidates: `data.vocabulary_size` of them from the slice's
        most frequent tokens (`frequent_candidates`: with the end token when `data.end_token_candidate`), or
        with `data.candidate_vocabulary: full` every token of the model's vocabulary in id order."""
        data = self.config.data
        if data.candidate_vocabulary == "full":
            return torch.arange(self.model_config.vocab_size, dtype=torch.long)
        end = self.model_config.eos_token_id if data.end_token_candidate else None
        try:
            return frequent_candidates(self.manifest["vocabulary"], data.vocabulary_size, end)
        except ValueError as error:
            raise ConfigError(f"data.vocabulary_size={data.vocabulary_size}, but the data slice {self.data_dir}: "
                              f"{error}") from None

    def _task_context(self) -> TaskContext:
        label_names = {name: task_label_names(task, self.manifest["sources"]) for name, task in self.tasks.items()}
        label_names = {name: names for name, names in label_names.items() if names}
        vocabulary = self.candidate_vocabulary()
        return TaskContext(self.processor.tokenizer, self.processor.image_processor, self.model_config,
                           label_names=label_names, vocabulary=vocabulary,
                           max_text_length=self.config.data.max_text_length, seed=self.config.seed,
                           workers=self.config.data.workers, mask_probability=self.config.data.mask_probability,
                           mlm_corruption=self.config.data.mlm_corruption,
                           text_padding=text_padding(self.config, self.compiled),
                           token_id_tasks=stored_token_id_tasks(
                               [name for name, task in self.config.tasks.items() if task.source is None],
                               self.manifest, self.processor.tokenizer))

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> str:
        """Write `checkpoints/step_<N>/` (see training/checkpoints.py) through a staging folder renamed when
        complete; keep the newest `train.keep_checkpoints`. A failed write (a full disk) removes the staging
        folder and raises CheckpointError naming the folder; earlier checkpoints are untouched."""
        acc = self.accelerator
        root = os.path.join(self.config.output_dir, "checkpoints")
        final = os.path.join(root, f"{CHECKPOINT_PREFIX}{self.step:07d}")
        staging = final + ".tmp"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(staging)  # under train.fsdp only the random-number states: nothing is prepared
            if self.sharded:
                save_training_state(self.model, self.optimizer, staging, acc.is_main_process)
            with open(os.path.join(staging, f"data_state_{acc.process_index}.json"), "w") as handle:
                json.dump(self.data_state if self.data_state is not None else self.loader.state_dict(), handle)
            acc.wait_for_everyone()
            if acc.is_main_process:
                metrics = os.path.join(self.config.output_dir, "metrics.jsonl")
                state = {"step": self.step, "micro_step": self.micro_step, "num_processes": acc.num_processes,
                         "config": self.config.to_dict(),
                         "metrics_bytes": os.path.getsize(metrics) if os.path.exists(metrics) else 0}
                with open(os.path.join(staging, TRAINER_STATE), "w") as handle:
                    json.dump(state, handle)
                write_checksums(staging)
        except (OSError, RuntimeError) as error:
            raise self._save_failed(staging, error) from None
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for old in list_checkpoints(self.config.output_dir)[: -self.config.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _save_failed(self, staging: str, error: Exception) -> CheckpointError:
        """The error to raise when writing `staging` failed: says when the disk is full (torch reports that as
        "unexpected pos"), removes the partial folder, names the last complete checkpoint."""
        import errno

        free = shutil.disk_usage(os.path.dirname(staging)).free
        shutil.rmtree(staging, ignore_errors=True)
        kept = list_checkpoints(self.config.output_dir)
        if getattr(error, "errno", None) == errno.ENOSPC or free < 64 * 2**20:
            what = f"no space left on the device holding {os.path.dirname(staging)} ({free / 2**20:.0f} MiB free)"
        else:
            what = f"{type(error).__name__}: {error}"
        return CheckpointError(f"writing checkpoint {os.path.basename(staging[:-4])} failed: {what}. The partial "
                               f"folder was removed; the last complete checkpoint is {kept[-1] if kept else 'none'}")

    def resume(self) -> str | None:
        """Continue from `train.resume` (auto: the newest checkpoint of output_dir), after checking the
        checkpoint's files (`checkpoints.verify_checkpoint`) and its config against this run's; `none` moves
        an earlier run aside. Returns the checkpoint resumed from, or None."""
        choice = self.config.train.resume
        acc = self.accelerator
        if choice == "none":  # start over: an earlier run in output_dir is moved aside, never mixed in
            if acc.is_main_process:
                moved = set_aside_previous_run(self.config.output_dir)
                if moved:
                    print(f"train.resume=none: the earlier run in {self.config.output_dir} was moved to {moved}")
            acc.wait_for_everyone()
            return None
        if choice == "auto":
            found = list_checkpoints(self.config.output_dir)
            if not found:
                return None
            path = found[-1]
        else:
            path = choice
            if not os.path.exists(os.path.join(path, TRAINER_STATE)):
                raise FileNotFoundError(f"train.resume={path!r} is not a checkpoint (no {TRAINER_STATE})")
        try:
            with open(os.path.join(path, TRAINER_STATE)) as handle:
                state = json.load(handle)
        except (OSError, ValueError) as error:
            raise unusable(path, f"{TRAINER_STATE} cannot be read ({error})") from None
        changes = config_changes(state.get("config", {}), self.config.to_dict())
        if changes and not self.config.train.resume_with_changes:
            raise ConfigError(
                f"checkpoint {path} was trained with other settings:\n  " + "\n  ".join(changes) + "\nResume "
                "with the checkpoint's settings, start over with train.resume=none, or continue with the new "
                "ones with train.resume_with_changes=true")
        if state["num_processes"] != acc.num_processes:
            raise CheckpointError(f"checkpoint {path} was written by {state['num_processes']} process(es), this run "
                                  f"has {acc.num_processes}: the data positions cannot be mapped (set train.resume: "
                                  f"none to start over, or resume with the same number of processes)")
        planted = sorted(f for f in os.listdir(path) if f.startswith("custom_checkpoint_") and f.endswith(".pkl"))
        if planted:  # accelerate would unpickle these with weights_only=False; this trainer writes none
            raise CheckpointError(f"checkpoint {path} holds {', '.join(planted)}: pickled objects this trainer "
                                  f"never writes or loads (the learning-rate schedule is rebuilt from the step). "
                                  f"Delete {'them' if len(planted) > 1 else 'it'} to resume from this checkpoint")
        verify_checkpoint(path, acc.process_index, {k: tuple(v.shape) for k, v in self.model.state_dict().items()})
        requested = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            acc.load_state(path)
            if self.sharded:
                load_training_state(self.model, self.optimizer, path)
            with open(os.path.join(path, f"data_state_{acc.process_index}.json")) as handle:
                self.loader.load_state_dict(json.load(handle))
        except Exception as error:  # files without checksums (older checkpoints), or ones that do not fit
            culprit = first_unreadable_file(path, acc.process_index)
            raise unusable(path, f"{culprit} cannot be read" if culprit else
                           f"its files do not load into this run ({type(error).__name__}: {str(error)[:500]})") from None
        for group, settings in zip(self.optimizer.param_groups, requested):
            group.update(settings)  # the optimizer's hyperparameters are the config's, not the checkpoint's
        self.step, self.micro_step = state["step"], state["micro_step"]
        restore_schedule(self.scheduler, self.step)
        self.history = self._history_until(path, state)
        return path

    def _history_until(self, path: str, state: dict) -> list[dict]:
        """The log of the run that wrote checkpoint `path`, up to it: its `metrics.jsonl` read to the length it
        had when the checkpoint was written. Resuming in the same output_dir also cuts the file back to that
        length, so the steps trained again after the checkpoint are logged once."""
        if "metrics_bytes" not in state:
            return state.get("history", [])  # a checkpoint written before metrics_bytes existed
        metrics = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "metrics.jsonl")
        if not os.path.exists(metrics):
            return []
        same_run = os.path.samefile(metrics, os.path.join(self.config.output_dir, "metrics.jsonl")) if os.path.exists(
            os.path.join(self.config.output_dir, "metrics.jsonl")) else False
        if same_run and self.accelerator.is_main_process and os.path.getsize(metrics) > state["metrics_bytes"]:
            with open(metrics, "r+b") as handle:
                handle.truncate(state["metrics_bytes"])
        self.accelerator.wait_for_everyone()
        with open(metrics, "rb") as handle:
            text = handle.read(state["metrics_bytes"]).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # ----------------------------------------------------------------------------------------- loop
    def train_step(self, step_index: int) -> dict:
        """One micro-batch: forward, backward and (when the accumulation is complete) clip and update. Its
        phases are `torch.profiler.record_function` regions named `STEP_REGIONS` (`benchmarks.bench_trainer`
        reads where the host time goes from them)."""
        acc = self.accelerator
        region = torch.profiler.record_function
        with region("trainer/batch"):
            batch = self.prefetcher.get(step_index)
        self.data_state = batch.data_state
        with region("trainer/to_device"):
            batch = batch.to(acc.device)
        task_config = self.config.tasks[batch.task.name]
        loss_weight = task_config.loss_weight if task_config.loss_weight is not None else batch.task.loss_weight
        shared = self.config.data.task_sampling == "shared"  # one task on every process this step
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step for CUDA graphs (reduce-overhead)
        with acc.accumulate(self.model):
            with region("trainer/forward"), self.autocast():
                shard = self.step_candidate_shard(step_index, batch.task)
                output = self.model(**batch.inputs, task_family=batch.task.family, candidate_shard=shard)
                loss = task_loss(batch, output, self.model_config.label_smoothing_for(batch.task.family),
                                 across_processes=shared)
            with region("trainer/backward"):
                acc.backward(loss * loss_weight)
            with region("trainer/update"):
                synced, grad_norm, skipped = acc.sync_gradients, None, False
                if synced:
                    clip = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
                    grad_norm = local_value(acc.clip_grad_norm_(self.model.parameters(), clip))
                    skipped = self.apply_update(grad_norm)
                    self.optimizer.zero_grad(set_to_none=True)
        with region("trainer/bookkeeping"):
            # one task on every process: the step's loss is the mean over processes; otherwise (per_process) the
            # processes ran different tasks, and the loss logged under this process's task is its own. The routers'
            # auxiliary losses, a part of `loss`, are logged apart so that the task's own loss can be read.
            aux = output.aux_loss
            logged = loss.detach() if aux is None else torch.stack([loss.detach(), aux.detach().to(loss.dtype)])
            if shared:
                logged = acc.reduce(logged, "mean")  # one collective for both
            if aux is not None:
                logged, aux = logged[0], logged[1]
            return send_step_result({"task": batch.task.name, "loss": logged, "aux_loss": aux,
                                     "tokens": step_tokens(batch, output), "synced": synced, "grad_norm": grad_norm,
                                     "skipped": skipped})

    def step_candidate_shard(self, step_index: int, task) -> CandidateShard | None:
        """`data.partition_candidates`: under `task_sampling: shared` the run's shard for a task with shared
        candidates (every process scores the same set); under `per_process` a shard holding the sets of
        every process's task at this micro-step (`CandidateShard.sets`, known to every process without
        communication: the draws are a function of the seed, the step and the rank), also for a process
        whose own task has none. None when nothing is split."""
        if self.candidate_shard is None:
            return None
        if self.config.data.task_sampling == "shared":
            return self.candidate_shard if task.family in SHARED_CANDIDATE_FAMILIES else None
        drawn = {self.loader.task_for_step(step_index, rank) for rank in range(self.accelerator.num_processes)}
        names = sorted(name for name in drawn if self.tasks[name].family in SHARED_CANDIDATE_FAMILIES)
        if not names:
            return None
        sets = tuple(self.candidate_set(name) for name in names)
        return replace(self.candidate_shard, sets=sets, own=names.index(task.name) if task.name in names else None)

    def candidate_set(self, name: str) -> dict[str, torch.Tensor]:
        """A task's candidate inputs on the device (`tasks.candidate_inputs`), built once."""
        if name not in self._candidate_sets:
            device = self.accelerator.device
            self._candidate_sets[name] = {key: value.to(device)
                                          for key, value in candidate_inputs(self.tasks[name], self.ctx).items()}
        return self._candidate_sets[name]

    def apply_update(self, grad_norm: torch.Tensor) -> torch.Tensor | bool:
        """The optimizer step after clipping, unless the gradient norm (the same on every process after the
        all-reduce) is not finite. Returns whether the update was skipped: a device flag where the decision
        stays on the device (fp16's loss scaler; a fused AdamW given the flag as its `found_inf`, which leaves
        parameters, moments and step count untouched), so the host does not wait for the step; a bool after
        reading the norm otherwise. `settle_results` reads the flag `RESULT_LAG` micro-steps later (before any
        checkpoint) and stops a run under `train.on_non_finite=stop`."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer accelerate wraps
        if self.config.train.mixed_precision == "fp16":
            self.optimizer.step()  # the loss scaler skips the update itself and lowers its scale
            return ~torch.isfinite(grad_norm)
        if inner.defaults.get("fused"):
            inner.found_inf = (~torch.isfinite(grad_norm)).float()
            self.optimizer.step()
            return inner.found_inf.bool()
        if math.isfinite(float(grad_norm)):
            self.optimizer.step()
            return False
        return True

    def start_prefetcher(self):
        """Batches from the next micro-step on, built `data.prefetch` steps ahead in worker processes
        (`data.prefetch_processes`) or a thread (`data.prefetch_worker`), in page-locked memory for a GPU
        (`data.pin_memory`: beside the workers or in the loop), handed over packed (`data.batch_transport`)."""
        data = self.config.data
        return start_prefetcher(self.loader, self.micro_step, data.prefetch,
                                pin_memory=self.accelerator.device.type == "cuda", worker=data.prefetch_worker,
                                processes=data.prefetch_processes, pin_in_loop=data.pin_memory == "loop",
                                packed=data.batch_transport == "packed")

    def autocast(self):
        """The mixed-precision context of a forward: accelerate's for a sharded model (`train.fsdp`), which it
        did not prepare; none otherwise (the prepared model's forward autocasts itself)."""
        return self.accelerator.autocast() if self.sharded else contextlib.nullcontext()

    @property
    def skips_non_finite(self) -> bool:
        return self.config.train.on_non_finite == "skip" or self.config.train.mixed_precision == "fp16"

    def evaluate(self, final: bool = False) -> dict:
        """`{task: metrics}` on the held-out rows (main process; the others wait, or under `train.fsdp` evaluate
        alongside it and return {}). The final evaluation also scores generated captions when
        `train.eval_caption_beam` is set."""
        acc = self.accelerator
        results = {}
        # a sharded model's forward gathers its weights from every process: all of them run it, process 0 keeps it
        if acc.is_main_process or self.sharded:
            if acc.is_main_process and not hasattr(self, "baselines"):
                self.baselines = self.trivial_baselines()
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.train.mixed_precision)
            model = acc.unwrap_model(self.model)
            results = evaluate_all(model, self.tasks, self.eval_rows(), self.ctx, acc.device, dtype)
            beam = self.config.train.eval_caption_beam if final else 0
            captioning = [name for name, task in self.tasks.items() if task.family == "captioning" and name in results]
            for name in captioning if beam else ():
                with torch.autocast(device_type=acc.device.type, dtype=dtype, enabled=dtype is not None):
                    scores = caption_generation_scores(model, self.tasks[name], self.eval_rows()[name], self.ctx,
                                                       acc.device, beam_size=beam)
                results[name].update(bleu4=scores["bleu4"], cider=scores["cider"])
        acc.wait_for_everyone()
        return results if acc.is_main_process else {}

    def eval_rows(self) -> dict[str, list[dict]]:
        """Per task, the held-out rows every evaluation uses (the first `data.eval_samples` of its test split)."""
        if not hasattr(self, "_eval_rows"):
            self._eval_rows = {}
            for name, task_config in self.config.tasks.items():
                spec = task_stream_spec(name, task_config, self.data_dir, self.manifest, "test")
                self._eval_rows[name] = read_rows(spec, self.config.data.eval_samples)
                if not self._eval_rows[name]:
                    raise EmptyDatasetError(f"task {name!r}: its test split ({spec.describe()}) has no rows to "
                                            f"evaluate on")
        return self._eval_rows

    def training_answer_counts(self, name: str) -> torch.Tensor:
        """`[K]` how often each candidate of task `name` is the answer in its first `BASELINE_TRAIN_ROWS`
        training rows (computed once)."""
        counts = self.__dict__.setdefault("_answer_counts", {})
        if name not in counts:
            spec = task_stream_spec(name, self.config.tasks[name], self.data_dir, self.manifest, "train")
            counts[name] = answer_counts(self.tasks[name], read_rows(spec, BASELINE_TRAIN_ROWS), self.ctx)
        return counts[name]

    def start_word_bias(self, model: UniPerceiverMoEForGenericPerception) -> None:
        """Start the word bias of each word-answer family (MLM, captioning) at the log-frequencies of its
        answers: the tasks' answer counts, each task weighted by its share of the answers trained
        (sampling weight x batch size)."""
        for family in ("mlm", "captioning"):
            names = [name for name, task in self.tasks.items() if task.family == family]
            if not names:
                continue
            pooled = torch.zeros(len(self.ctx.vocabulary), dtype=torch.float64)
            for name in names:
                counts = self.training_answer_counts(name).double()
                share = self.config.tasks[name].weight * self.config.tasks[name].batch_size
                pooled += share * counts / counts.sum().clamp(min=1)
            total = sum(float(self.training_answer_counts(name).sum()) for name in names)
            model.word_bias.start_from_log_frequencies(family, self.ctx.vocabulary, pooled / pooled.sum() * total)

    def trivial_baselines(self) -> dict[str, dict]:
        """Per task, what ignoring the input scores on the evaluated rows (`evaluation.trivial_baseline`),
        the answer taken from the first `BASELINE_TRAIN_ROWS` training rows."""
        baselines = {}
        for name in self.config.tasks:
            task = self.tasks[name]
            counts = None if task.family == "retrieval" else self.training_answer_counts(name)
            baselines[name] = trivial_baseline(task, counts, self.eval_rows()[name], self.ctx)
        return baselines

    def log(self, values: dict) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        self.history.append(values)
        with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(values) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        if scalars and acc.trackers:
            acc.log(scalars, step=values["step"])

    def train(self) -> dict:
        acc, cfg = self.accelerator, self.config.train
        os.makedirs(self.config.output_dir, exist_ok=True)
        resumed = self.resume()
        if self.tracker:
            acc.init_trackers("pretrain", config={"seed": self.config.seed, "max_steps": cfg.max_steps,
                                                  "routing": self.model_config.moe_routing, "lr": self.config.optim.lr})
        if resumed and acc.is_main_process:
            print(f"resumed from {resumed} at step {self.step}")
        self.eval_rows()  # an empty test split is an error now, not a task missing from the report
        progress = tqdm(total=cfg.max_steps, initial=self.step, desc="pretrain", disable=not acc.is_main_process,
                        dynamic_ncols=True)
        self.prefetcher = self.start_prefetcher()
        try:
            stopped_early = self._train_steps(progress)
            self.training_peak_memory_gib = peak_memory_gib(acc.device)  # before the final evaluation and save
        except (NonFiniteTraining, KeyboardInterrupt) as error:
            progress.close()
            self.prefetcher.close()
            kept = list_checkpoints(self.config.output_dir)
            last = kept[-1] if kept else "none"
            if isinstance(error, NonFiniteTraining):
                raise NonFiniteTraining(
                    f"{error}: training stopped without applying it; nothing more was saved (last good "
                    f"checkpoint: {last}). Lower optim.lr or check the task's data") from None
            raise TrainingInterrupted(
                f"interrupted at step {self.step} of {cfg.max_steps}; the steps since the last checkpoint were not "
                f"saved. Last checkpoint: {last}; run the same command again to continue from it") from None
        progress.close()
        self.prefetcher.close()
        final_eval = self.evaluate(final=True)
        self.log_eval(final_eval)
        if not stopped_early and (not cfg.save_every or self.step % cfg.save_every):
            self.save_checkpoint()
        self.save_final(final_eval)
        acc.end_training()
        return final_eval

    def _train_steps(self, progress) -> bool:
        """Train until `train.max_steps`, logging, evaluating and saving on the way; True when
        `train.max_minutes` stopped it first.

        A step's results (loss, tokens, gradient norm, skipped flag) start their copy to the host as the
        step's last work (`send_step_result`) and are read `RESULT_LAG` micro-steps later, so the host queues
        the next steps while the accelerator works; they are read in step order (`settle_results`), and all of
        them before anything that reports or saves (a summary line, an evaluation, a checkpoint, the end)."""
        acc, cfg = self.accelerator, self.config.train
        crash_at = int(os.environ.get("UNIPERCEIVER_TEST_CRASH_AT_STEP", "0"))  # tests: simulate a kill
        interrupt_at = int(os.environ.get("UNIPERCEIVER_TEST_INTERRUPT_AT_STEP", "0"))  # tests: a Ctrl-C
        start_time = time.perf_counter()
        self._pending, self._window, self._window_tokens = [], {}, 0
        self._skipped_in_a_row = 0
        self._graphs_seen = compiled_graph_count() if self.compiled else 0
        self._recorded_seen = CudaGraphRecordings.reading()[0]
        window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            result = self.train_step(self.micro_step)
            self.micro_step += 1
            result.update(step=self.step + 1, micro_step=self.micro_step)
            self._pending.append(result)
            if not result["synced"]:
                self.settle_results(keep=RESULT_LAG)
                continue
            self.scheduler.step()
            self.step += 1
            result["lr"] = self.scheduler.get_last_lr()[0]
            progress.update(1)
            summarise = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
            evaluate = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps
            out_of_time = cfg.max_minutes is not None and (time.perf_counter() - start_time) / 60 > cfg.max_minutes
            save = bool(cfg.save_every) and self.step % cfg.save_every == 0 or out_of_time
            last = self.settle_results(keep=0 if summarise or evaluate or save or self.step in (crash_at, interrupt_at)
                                       else RESULT_LAG)
            if crash_at and self.step == crash_at:
                os._exit(17)
            if interrupt_at and self.step == interrupt_at:
                import signal

                # Python's Ctrl-C handler, as in a terminal, also where the launcher ignored SIGINT (a shell
                # without job control starts background commands so)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the signal handler raises KeyboardInterrupt here
            if summarise:
                elapsed = time.perf_counter() - window_start
                window = self._window
                summary = {"step": self.step, "tokens_per_second": self._window_tokens / max(elapsed, 1e-9),
                           "steps_per_second": len(sum(window.values(), [])) / cfg.grad_accum / max(elapsed, 1e-9)}
                summary.update({f"train_loss/{k}": sum(v) / len(v) for k, v in window.items()})
                if acc.device.type == "cuda":
                    summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
                if self.compiled:  # the compilation's cost: graphs built and CUDA graphs recorded in this
                    graphs, recorded = compiled_graph_count(), CudaGraphRecordings.reading()[0]  # window
                    summary["compiled_graphs"], self._graphs_seen = graphs - self._graphs_seen, graphs
                    summary["cuda_graphs_recorded"], self._recorded_seen = recorded - self._recorded_seen, recorded
                    if summary["compiled_graphs"] and acc.is_main_process:
                        tqdm.write(f"steps to {self.step}: torch.compile built {summary['compiled_graphs']} graphs "
                                   f"({graphs} in all) in {elapsed:.0f} s, the first batches of each task's shapes")
                self.log(summary)
                progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{summary['tokens_per_second']:.0f}")
                self._window, self._window_tokens, window_start = {}, 0, time.perf_counter()
            if evaluate:
                self.log_eval(self.evaluate())
            if save:
                self.save_checkpoint()
            if out_of_time:
                if acc.is_main_process:
                    tqdm.write(f"stopping at step {self.step} of {cfg.max_steps}: train.max_minutes={cfg.max_minutes} "
                               f"reached; checkpoint saved, run the same command again to continue")
                return True
        return False

    def settle_results(self, keep: int) -> dict | None:
        """Read the pending step results, oldest first, until `keep` remain: stop on a non-finite step (or on
        too many skipped in a row), add each to the loss window, log each optimizer step's row. Returns the
        last one read."""
        acc, cfg = self.accelerator, self.config.train
        result = None
        while len(self._pending) > keep:
            result = read_step_result(self._pending.pop(0))
            if result["skipped"]:
                if not self.skips_non_finite:
                    raise NonFiniteTraining(f"the gradient norm of step {result['step']} ({result['task']}) is "
                                            f"{result['grad_norm']} (loss {result['loss']})")
                self._skipped_in_a_row += 1
                if self._skipped_in_a_row > MAX_SKIPPED_IN_A_ROW:
                    raise NonFiniteTraining(f"the gradient norm was not finite in {self._skipped_in_a_row} steps in "
                                            f"a row (the last: step {result['step']}, {result['task']})")
                if acc.is_main_process and cfg.mixed_precision != "fp16":
                    tqdm.write(f"step {result['step']} ({result['task']}): gradient norm {result['grad_norm']}, "
                               f"not applied (train.on_non_finite=skip)")
            elif result["synced"]:
                self._skipped_in_a_row = 0
            self._window.setdefault(result["task"], []).append(result["loss"])
            self._window_tokens += result["tokens"] * acc.num_processes
            if result["synced"]:
                self.log({"step": result["step"], "micro_step": result["micro_step"], "task": result["task"],
                          "loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                          **({"aux_loss": result["aux_loss"]} if result.get("aux_loss") is not None else {}),
                          **({"skipped": True} if result["skipped"] else {})})
        return result

    def log_eval(self, results: dict) -> None:
        flat = {"step": self.step}
        for task, metrics in results.items():
            flat.update({f"eval/{task}/{k}": v for k, v in metrics.items()})
        if results:
            self.log(flat)

    def save_final(self, results: dict) -> None:
        acc = self.accelerator
        weights = full_model_state(self.model) if self.sharded else None  # gathered from every process
        if not acc.is_main_process:
            return
        final_dir = os.path.join(self.config.output_dir, "final")
        if weights is None:
            model = acc.unwrap_model(self.model)
        else:  # the gathered weights in an unsharded copy of the model
            model = UniPerceiverMoEForGenericPerception(self.model_config)
            model.load_state_dict(weights)
        model.save_pretrained(final_dir)
        self.processor.save_pretrained(final_dir)
        write_report(self, results)

