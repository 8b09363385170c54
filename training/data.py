"""Streaming multi-task data: one `datasets` stream per task, one task per step, exact resumption.

* A task's samples come from local shards (parquet, webdataset or json; `load_dataset(..., streaming=True)`)
  or from any Hub dataset with a column mapping (`{"hub": "user/name", "split": "train",
  "columns": {"img": "image", "fine_label": "label"}}`).
* Shuffling is resumable by construction: the shard order is permuted per epoch from (seed, epoch) and
  rows are shuffled inside blocks of `shuffle_block` rows with a generator seeded from (seed, epoch, block
  start) (a batched `map`). `IterableDataset.state_dict()` then restores the exact position (a shuffle
  *buffer* would be refilled differently on resume).
* `split_dataset_by_node` shards across processes: whole shards when their number divides the world size,
  otherwise every process reads the same shuffled stream and keeps every W-th row, so that W processes see
  exactly the rows one process would (the 1-process == 2-process equivalence).
* The task of step s is drawn from the task weights with a generator seeded from (seed, s): every process
  agrees without communication, and resumption needs no sampler state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from modeling_uniperceiver_moe.routing import repeated_slices_cut

from .tasks import MalformedSample, Task, TaskBatch, TaskContext, build_batch

logger = logging.getLogger(__name__)


class EmptyDatasetError(RuntimeError):
    pass


@dataclass
class StreamSpec:
    """Where a task's rows come from: local `files` of `format`, or a Hub dataset `hub` (+ `config`, `split`).
    `columns` renames source columns to the task's (`image`, `frames`, `text`, `caption`, `label`, `key`)."""

    files: list[str] | None = None
    format: str = "parquet"
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return self.hub or (f"{len(self.files)} {self.format} file(s) like {self.files[0]}" if self.files else "nothing")


def block_shuffle(batch: dict, indices: list[int], seed: int, epoch: int) -> dict:
    """Permute one block of rows with a generator seeded by (seed, epoch, first row index)."""
    order = np.random.default_rng([seed, epoch, indices[0]]).permutation(len(indices))
    return {column: [values[i] for i in order] for column, values in batch.items()}


def open_stream(spec: StreamSpec, seed: int, epoch: int, shuffle_block: int, rank: int, world_size: int,
                shuffle: bool = True):
    """The `IterableDataset` of one epoch (undecoded images; renamed columns; shuffled; this rank's part)."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    if spec.files:
        files = list(spec.files)
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"data files not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if shuffle:
            files = [files[i] for i in np.random.default_rng([seed, epoch, 1]).permutation(len(files))]
        dataset = load_dataset(spec.format, data_files=files, split="train", streaming=True)
    elif spec.hub:
        dataset = load_dataset(spec.hub, spec.config, split=spec.split, streaming=True)
    else:
        raise ValueError("a stream needs `files` or `hub`")
    dataset = dataset.decode(False)
    if spec.columns:
        present = set(dataset.column_names or spec.columns)
        absent = sorted(set(spec.columns) - present)
        if absent:
            raise ValueError(f"{spec.describe()}: columns {absent} not found (it has {sorted(present)})")
        dataset = dataset.rename_columns(spec.columns)
    if shuffle and shuffle_block > 1:
        dataset = dataset.map(block_shuffle, batched=True, batch_size=shuffle_block, with_indices=True,
                              fn_kwargs={"seed": seed, "epoch": epoch})
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


class TaskStream:
    """Endless rows of one task for this process: epochs follow each other; `state_dict()` is exact."""

    def __init__(self, name: str, spec: StreamSpec, seed: int, shuffle_block: int, rank: int = 0, world_size: int = 1):
        self.name, self.spec, self.seed, self.shuffle_block = name, spec, seed, shuffle_block
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._dataset = None
        self._iterator = None
        self._pending_state = None

    def _start(self):
        self._dataset = open_stream(self.spec, self.seed, self.epoch, self.shuffle_block, self.rank, self.world_size)
        self._fresh_epoch = self._pending_state is None
        if self._pending_state is not None:
            self._dataset.load_state_dict(self._pending_state)
            self._pending_state = None
        self._epoch_rows = 0
        self._iterator = iter(self._dataset)

    def take(self, count: int) -> list[dict]:
        rows = []
        while len(rows) < count:
            if self._iterator is None:
                self._start()
            try:
                rows.append(next(self._iterator))
                self._epoch_rows += 1
            except StopIteration:
                if self._epoch_rows == 0 and self._fresh_epoch:
                    raise EmptyDatasetError(f"task {self.name!r}: the stream ({self.spec.describe()}) has no rows for "
                                            f"process {self.rank} of {self.world_size}") from None
                self.epoch += 1
                self._iterator = None
        return rows

    def state_dict(self) -> dict:
        dataset_state = self._dataset.state_dict() if self._dataset is not None else self._pending_state
        return {"epoch": self.epoch, "dataset": dataset_state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._pending_state = state["dataset"]
        self._dataset = self._iterator = None


@dataclass
class TaskEntry:
    """A task in the mix: its global batch size (split evenly across processes) and sampling weight."""

    task: Task
    weight: float
    batch_size: int
    stream: TaskStream


TASK_SAMPLINGS = ("per_process", "shared")


class MultiTaskLoader:
    """Draws each step's task by weight; builds `TaskBatch`es of `batch_size / world_size` rows.

    task_sampling: "per_process" (the reference: process r draws its own task for step s, from a generator
    seeded by (seed, s, r), so one step averages several tasks; process 0 draws what one process would) or
    "shared" (every process runs the same task in a step). on_bad_sample: "skip" logs the malformed row
    (task, key, reason) and draws a replacement; "error" raises `MalformedSample` naming them.
    """

    def __init__(self, entries: list[TaskEntry], ctx: TaskContext, seed: int, world_size: int = 1,
                 on_bad_sample: str = "skip", augment: bool = False, rank: int = 0,
                 task_sampling: str = "per_process"):
        if not entries:
            raise ValueError("no tasks to train on")
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        if task_sampling not in TASK_SAMPLINGS:
            raise ValueError(f"task_sampling must be one of {TASK_SAMPLINGS}, got {task_sampling!r}")
        for entry in entries:
            if entry.batch_size % world_size:
                raise ValueError(f"task {entry.task.name!r}: batch_size {entry.batch_size} is not divisible by the "
                                 f"{world_size} processes")
            if entry.weight < 0:
                raise ValueError(f"task {entry.task.name!r}: weight must be >= 0")
        self.entries = {e.task.name: e for e in entries}
        weights = np.array([e.weight for e in entries], dtype=np.float64)
        if weights.sum() <= 0:
            raise ValueError("task weights sum to 0")
        self.names = [e.task.name for e in entries]
        self.probabilities = weights / weights.sum()
        self.ctx, self.seed, self.world_size, self.on_bad_sample = ctx, seed, world_size, on_bad_sample
        self.rank, self.task_sampling = rank, task_sampling
        self.augment = augment
        self.skipped: list[tuple[str, str, str]] = []

    def task_for_step(self, step: int, rank: int | None = None) -> str:
        """The task this process (or process `rank`) runs at `step`: a pure function of (seed, step[, rank])."""
        rank = self.rank if rank is None else rank
        key = [self.seed, step, 7] + ([rank] if self.task_sampling == "per_process" and rank > 0 else [])
        return self.names[int(np.random.default_rng(key).choice(len(self.names), p=self.probabilities))]

    def batch(self, step: int) -> TaskBatch:
        name = self.task_for_step(step)
        entry = self.entries[name]
        local = entry.batch_size // self.world_size
        rows = entry.stream.take(local)
        for _ in range(100):
            built = build_batch(entry.task, rows, self.ctx, entry.stream.epoch, augment=self.augment, training=True)
            if not built.skipped:
                built.data_state = self.state_dict()  # the position right after this batch (for checkpoints)
                return built
            reasons = "; ".join(f"{key}: {why}" for key, why in built.skipped)
            if self.on_bad_sample == "error":
                raise MalformedSample(f"task {name!r}: malformed sample(s) {reasons} (set data.on_bad_sample: skip "
                                      f"to skip them)")
            logger.warning("task %s: skipped malformed sample(s) %s", name, reasons)
            self.skipped += [(name, key, why) for key, why in built.skipped]
            bad = {key for key, _ in built.skipped}
            rows = [r for r in rows if str(r.get("key", r.get("idx", "?"))) not in bad]
            rows += entry.stream.take(local - len(rows))
        raise MalformedSample(f"task {name!r}: could not assemble a batch of valid samples")

    def state_dict(self) -> dict:
        return {name: entry.stream.state_dict() for name, entry in self.entries.items()}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.entries))
        if unknown:
            raise ValueError(f"the checkpoint's data state has tasks {unknown} that this run does not train")
        for name, entry_state in state.items():
            self.entries[name].stream.load_state_dict(entry_state)


PIN_MEMORY_PLACES = ("thread", "loop")  # data.pin_memory: where the batches are pinned for a CUDA device


class Prefetcher:
    """Builds the batches of the next `depth` steps in a background thread, in step order (decoding and
    tokenising overlap the accelerator's work). Each batch carries the loader state right after it, so a
    checkpoint taken after consuming step s resumes exactly at s + 1 whatever was prefetched. `pin_memory`
    puts each batch in page-locked memory (for copies to a GPU that do not block the training loop): in the
    building thread, or with `pin_in_loop` in `get`."""

    def __init__(self, loader: MultiTaskLoader, first_step: int, depth: int = 2, pin_memory: bool = False,
                 pin_in_loop: bool = False):
        import queue
        import threading

        self.loader, self.next_step = loader, first_step
        self.pin_memory, self.pin_in_loop = pin_memory and not pin_in_loop, pin_memory and pin_in_loop
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True) if depth > 0 else None
        if self._thread is not None:
            self._thread.start()

    def _build(self, step: int) -> TaskBatch:
        batch = self.loader.batch(step)
        return batch.pin_memory() if self.pin_memory else batch

    def _work(self):
        step = self.next_step
        while not self._stop.is_set():
            try:
                item = (step, self._build(step), None)
            except BaseException as error:  # handed to the consumer, raised there
                item = (step, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except Exception:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int) -> TaskBatch:
        if self._thread is None:
            return self._build(step)
        got, batch, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: wanted step {step}, got {got}")
        return batch.pin_memory() if self.pin_in_loop else batch

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


PACKED_ALIGNMENT = 64  # bytes: each packed tensor starts at a multiple (any dtype's view is aligned)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in a packed byte buffer: bytes [offset, offset + nbytes) as `dtype` of
    `stored_shape`, seen as `shape` (a broadcast over the dimensions where `stored_shape` has 1 and `shape`
    more: a tensor packed from an `expand` keeps the one slice it repeats; otherwise the two are equal)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    stored_shape: tuple[int, ...]


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, TensorSlot]]:
    """Host tensors -> one uint8 buffer `[total]` holding each one's bytes (contiguous, row-major; of a
    broadcast view, the slice it repeats), and the slot of each in it. `unpack_tensors` gives them back as
    views of the buffer, equal to the originals (broadcast views again where they were)."""
    slots, parts, offset = {}, {}, 0
    for name, tensor in tensors.items():
        part = parts[name] = repeated_slices_cut(tensor, key_dims=0)
        slots[name] = TensorSlot(tensor.dtype, tuple(tensor.shape), offset, part.numel() * part.element_size(),
                                 tuple(part.shape))
        offset += -(-slots[name].nbytes // PACKED_ALIGNMENT) * PACKED_ALIGNMENT
    buffer = torch.empty(offset, dtype=torch.uint8)
    for name, part in parts.items():
        slot = slots[name]
        if slot.nbytes:
            buffer[slot.offset:slot.offset + slot.nbytes].view(part.dtype).copy_(part.reshape(-1))
    return buffer, slots


def unpack_tensors(buffer: torch.Tensor, slots: dict[str, TensorSlot]) -> dict[str, torch.Tensor]:
    """The tensors `pack_tensors` packed, as views of `buffer` (pinned if the buffer is)."""
    return {name: buffer[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.stored_shape).expand(slot.shape)
            for name, slot in slots.items()}


class PackedBatch:
    """A `TaskBatch` whose tensors share one byte buffer, the form in which it leaves a worker process.

    torch shares every tensor between processes as a storage of its own, each a file descriptor the
    receiver fetches over a socket from a Python thread of the worker (which needs the worker's interpreter
    lock, held by the batch builder while it builds the next batch): 8-11 round trips for a batch. Packed, a
    batch is one storage, for one extra copy of its bytes in the worker. The DataLoader's pinning thread
    pins the one buffer (`pin_memory`); `unpack` gives the `TaskBatch` back with its tensors as views of it."""

    def __init__(self, batch: TaskBatch):
        tensors = {f"inputs.{k}": v for k, v in batch.inputs.items() if torch.is_tensor(v)}
        tensors["labels"] = batch.labels
        if batch.pixel_table is not None:
            tensors["pixel_table"] = batch.pixel_table
        self.buffer, self.slots = pack_tensors(tensors)
        self.batch = replace(batch, inputs={k: None if f"inputs.{k}" in tensors else v for k, v in batch.inputs.items()},
                             labels=None, pixel_table=None)  # the rest of the batch, pickled as it is

    def pin_memory(self) -> "PackedBatch":
        self.buffer = self.buffer.pin_memory()
        return self

    def unpack(self) -> TaskBatch:
        tensors = unpack_tensors(self.buffer, self.slots)
        inputs = {k: tensors.get(f"inputs.{k}", v) for k, v in self.batch.inputs.items()}
        return replace(self.batch, inputs=inputs, labels=tensors["labels"], pixel_table=tensors.get("pixel_table"))


class StepBatches(IterableDataset):
    """The loader's batches of the steps that draw one of `tasks`, from `first_step` on, as `(step, batch)` in
    step order (what a worker process of `ProcessPrefetcher` runs), each batch a `PackedBatch` unless
    `packed` is False. Only those tasks' streams move, so another worker can own the other tasks."""

    def __init__(self, loader: MultiTaskLoader, first_step: int, tasks: frozenset[str], packed: bool = True):
        self.loader, self.first_step, self.tasks, self.packed = loader, first_step, tasks, packed

    def __iter__(self):
        step = self.first_step
        while True:
            if self.loader.task_for_step(step) in self.tasks:
                batch = self.loader.batch(step)
                yield step, PackedBatch(batch) if self.packed else batch
            step += 1


def share_tasks(loader: MultiTaskLoader, processes: int) -> list[frozenset[str]]:
    """The loader's drawn tasks (weight > 0) split over at most `processes` worker processes, each task to one:
    the longest-processing-time rule on an estimated cost per step of sampling weight x rows x frames, so
    that each worker has about the same work."""
    def cost(entry: TaskEntry) -> float:
        frames = loader.ctx.model_config.num_frames if entry.task.family == "video_classification" else 1
        return entry.weight * entry.batch_size * max(1, frames)

    entries = sorted((e for e in loader.entries.values() if e.weight > 0), key=lambda e: (-cost(e), e.task.name))
    shares: list[list[str]] = [[] for _ in range(max(1, min(processes, len(entries))))]
    loads = [0.0] * len(shares)
    for entry in entries:
        lightest = loads.index(min(loads))
        shares[lightest].append(entry.task.name)
        loads[lightest] += cost(entry)
    return [frozenset(share) for share in shares]


PREFETCH_WORKERS = ("process", "thread")
BATCH_TRANSPORTS = ("packed", "tensors")  # data.batch_transport: how a worker process hands a batch over


class ProcessPrefetcher:
    """`Prefetcher`'s interface, with the batches built in `processes` worker processes, one torch `DataLoader`
    worker each: the decoding and tokenising no longer hold the training process's interpreter lock, so the
    training loop queues kernels without waiting for them. Each worker is forked with the loader as it stands
    (no pickling of the streams) and owns a share of the tasks (`share_tasks`): it builds the batches of the
    steps that draw its tasks, in step order, so every task's stream moves exactly as in one process. `get`
    reads step s from the worker owning s's task and gives the batch the whole loader state right after it
    (the owner's tasks from the batch, the others' as their workers last left them), so exact resumption is
    as with the thread. Each batch crosses the process boundary as one buffer (`PackedBatch`; `packed=False`
    sends its tensors one by one). `pin_memory` pins the batches in the training process: in the DataLoader's
    pinning thread, or with `pin_in_loop` in `get`, in the training loop's own thread. Each worker builds
    `depth / processes` batches ahead (rounded up), so the batches waiting in page-locked memory stay about
    `depth` whatever the number of workers. A worker's error is raised by `get`
    with its type."""

    def __init__(self, loader: MultiTaskLoader, first_step: int, depth: int = 2, pin_memory: bool = False,
                 processes: int = 1, pin_in_loop: bool = False, packed: bool = True):
        import multiprocessing

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each forked worker tokenises alone
        self._loader, self._pin_in_loop = loader, pin_memory and pin_in_loop
        self._state = loader.state_dict()  # the position before first_step; updated from each batch read
        self._shares = share_tasks(loader, processes)
        self._owner = {name: index for index, share in enumerate(self._shares) for name in share}
        self._iterators = []
        ahead = max(1, -(-depth // len(self._shares)))  # the batches in flight stay about `depth` in all
        for share in self._shares:
            worker = DataLoader(StepBatches(loader, first_step, share, packed), batch_size=None, num_workers=1,
                                prefetch_factor=ahead, pin_memory=pin_memory and not pin_in_loop,
                                multiprocessing_context=multiprocessing.get_context("fork"),
                                generator=torch.Generator().manual_seed(0))  # the global torch RNG is untouched
            self._iterators.append(iter(worker))

    def get(self, step: int) -> TaskBatch:
        owner = self._owner[self._loader.task_for_step(step)]
        got, batch = next(self._iterators[owner])
        if got != step:
            raise RuntimeError(f"prefetcher out of order: wanted step {step}, got {got}")
        if self._pin_in_loop:
            batch = batch.pin_memory()
        if isinstance(batch, PackedBatch):
            batch = batch.unpack()
        self._state.update((name, batch.data_state[name]) for name in self._shares[owner])
        batch.data_state = dict(self._state)
        return batch

    def close(self):
        iterators, self._iterators = self._iterators, []
        for iterator in iterators:
            iterator._shutdown_workers()


def start_prefetcher(loader: MultiTaskLoader, first_step: int, depth: int, pin_memory: bool = False,
                     worker: str = "process", processes: int = 1, pin_in_loop: bool = False, packed: bool = True):
    """The prefetcher of `data.prefetch` / `data.prefetch_worker` / `data.prefetch_processes` /
    `data.pin_memory`: batches built `depth` steps ahead in `processes` worker processes
    (`ProcessPrefetcher`; where `fork` exists) or a thread (`Prefetcher`); depth 0 builds each batch when it
    is asked for. With `pin_memory`, each batch is pinned beside its worker or, with `pin_in_loop`, by `get`.
    `packed` (worker processes): each batch crosses to this process as one buffer (`PackedBatch`)."""
    import multiprocessing

    if worker not in PREFETCH_WORKERS:
        raise ValueError(f"prefetch worker must be one of {PREFETCH_WORKERS}, got {worker!r}")
    if processes < 1:
        raise ValueError(f"prefetch processes must be >= 1, got {processes}")
    if depth > 0 and worker == "process" and "fork" in multiprocessing.get_all_start_methods():
        return ProcessPrefetcher(loader, first_step, depth, pin_memory, processes, pin_in_loop, packed)
    return Prefetcher(loader, first_step, depth, pin_memory, pin_in_loop)


def read_split(data_dir: str, manifest: dict, source: str, split: str, limit: int | None = None) -> list[dict]:
    """The first `limit` (default all) rows of a bundled source's split, in stored order."""
    files = [os.path.join(data_dir, f["path"]) for f in manifest["sources"][source]["splits"][split]["files"]]
    return read_rows(StreamSpec(files=files), limit or 10**9)


def read_rows(spec: StreamSpec, count: int) -> list[dict]:
    """The first `count` rows of a stream in stored order (evaluation: no shuffle, one process)."""
    dataset = open_stream(spec, seed=0, epoch=0, shuffle_block=1, rank=0, world_size=1, shuffle=False)
    rows = []
    for row in dataset:
        rows.append(row)
        if len(rows) >= count:
            break
    return rows
