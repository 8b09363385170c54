"""The task registry: how a sample of each pre-training task becomes model inputs, candidate targets,
router inputs and a loss. Adding a task is one `register(Task(...))` entry (a name, a task family, a data
source and the attribute vectors of its segments); the family's batch builder does the rest.

Families (the formulas of `../docs/design.md`, one per task type):

| family | input | queries | candidates | attributes (input / target) |
|---|---|---|---|---|
| image_classification | image | SPE | class names (text) | 10011000 / 10010110 |
| video_classification | video | SPE | class names (text) | 10011000 / 10010110 |
| text_classification | text + [SPE], or a prompt around it (GLUE) | the inner [SPE] | label descriptions or words (text) | 01010100 / 11010110 |
| mlm | text, 15% whole words masked | masked tokens | vocabulary words `[SPE] w [EOS]` | 01010100 / 11010110 |
| captioning | image + words + placeholders | placeholders | vocabulary words | 11011000 (image) + 11010101 (text) / 11010110 |
| retrieval | image | SPE | the batch's captions (gathered across processes), symmetric | 10011000 / 10010110 |

Losses are label-smoothed cross-entropy over candidates. Token-level losses (MLM, captioning) are summed
and divided by the number of predicted tokens of the *global* batch, so that N processes x b samples give
the same loss and gradients as one process with N*b samples.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.nn import functional as F

from modeling_uniperceiver_moe.modeling_uniperceiver_moe import symmetric_cross_entropy
from modeling_uniperceiver_moe.routing import TokenAttributes


class MalformedSample(ValueError):
    """A sample that cannot become model inputs (undecodable image, empty text, label out of range, ...)."""


class UnknownTask(KeyError):
    pass


# --------------------------------------------------------------------------------------------- attributes
A = TokenAttributes.from_bits
ATTRIBUTES = {
    "classification_input": A("10011000"),
    "class_name_target": A("10010110"),
    "text_input": A("01010100"),
    "word_target": A("11010110"),
    "caption_image": A("11011000"),
    "caption_text": A("11010101"),
    "retrieval_image": A("10011000"),
    "retrieval_text_target": A("10010110"),
}


@dataclass(frozen=True)
class Task:
    """One pre-training task.

    name: unique task name (used in configs, logs and eval reports).
    family: one of FAMILY_BUILDERS (also the model's `task_family`, i.e. its temperature).
    source: a data source of `data_sources.SOURCES` (or a user stream with the same columns).
    task_id: the id seen by task routing (`moe_routing="task"`); unique per task.
    loss_weight: default loss weight (reference: classification 1.0, video 0.1, MLM 0.5, caption 1.0,
        retrieval 0.5); a config may override it.
    text_column: the column holding text for text tasks / captions.
    template: for text classification, the prompt the row's sentences are put in (`TextTemplate`: the
        reference's GLUE prompts); None = the text, then [SPE].
    """

    name: str
    family: str
    source: str
    task_id: int
    loss_weight: float = 1.0
    text_column: str = "text"
    input_attributes: TokenAttributes | None = None
    target_attributes: TokenAttributes | None = None
    template: "TextTemplate | None" = None


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    if task.family not in FAMILY_BUILDERS:
        raise ValueError(f"task {task.name!r}: unknown family {task.family!r}; known: {sorted(FAMILY_BUILDERS)}")
    if any(t.task_id == task.task_id for t in TASKS.values()):
        raise ValueError(f"task {task.name!r}: task_id {task.task_id} is already used")
    TASKS[task.name] = task
    return task


def task_label_names(task: Task, sources: dict) -> list[str] | None:
    """The candidate texts of a classification task: its prompt's label words, else the class names of its
    source in a data slice's manifest (`sources` = `manifest["sources"]`); None for the other families."""
    if task.template is not None:
        return list(task.template.label_words)
    return sources.get(task.source, {}).get("label_names") or None


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name]


TEXT_PADDINGS = ("longest", "buckets", "auto")  # data.text_padding; auto is resolved by config.text_padding
SMALLEST_BUCKET = 8


def bucket_length(length: int, limit: int) -> int:
    """The padded length of a batch whose longest text has `length` tokens under `data.text_padding:
    buckets`: the first of 8, 16, 32, ... that holds it, at most `limit` (never below `length`). A task's
    batches then take a handful of shapes, so a compiled step (CUDA graphs) is built a few times, not once
    per length."""
    size = SMALLEST_BUCKET
    while size < length:
        size *= 2
    return max(length, min(size, limit))


# --------------------------------------------------------------------------------------------- prompts
TEMPLATE_SLOT = re.compile(r"\{(\d)\}")


@dataclass(frozen=True)
class TextTemplate:
    """A prompt around one or two sentences holding one [SPE], whose output is the query compared with the
    label words (the reference's GLUE prompts, docs/training.md).

    text: the prompt; `{0}`, `{1}` stand for the row's sentences (`columns`, in that order), special tokens
        (`<|endoftext|>`, `[SPE]`) are written as such. Every piece is tokenised on its own, as the reference
        does, and the whole is lower-cased by the tokenizer.
    label_words: the candidate text of each label id of the rows (encoded `word <|endoftext|>` like any
        class name).
    drop_final_period: the first sentence loses a final "." token (the reference's pair prompts but MNLI's).
    """

    text: str
    columns: tuple[str, ...]
    label_words: tuple[str, ...]
    drop_final_period: bool = False

    def __post_init__(self):
        slots = [int(slot) for slot in TEMPLATE_SLOT.findall(self.text)]
        if slots != list(range(len(self.columns))):
            raise ValueError(f"template {self.text!r}: slots {slots} do not match the columns {self.columns}")
        if self.text.count("[SPE]") != 1:
            raise ValueError(f"template {self.text!r} must hold exactly one [SPE] (the query)")


def render_template(template: TextTemplate, sentences: list[list[int]], encode_piece, period_id: int,
                    budget: int) -> list[int]:
    """The prompt's token ids: `sentences` (the row's sentences, already tokenised without start or end
    token) put in the template's slots between its tokenised pieces (`encode_piece(text) -> ids`). The
    sentences, never the prompt, are cut to fit `budget` tokens: a token at a time from the end of the
    longest."""
    sentences = [list(ids) for ids in sentences]
    if template.drop_final_period and sentences[0] and sentences[0][-1] == period_id:
        sentences[0] = sentences[0][:-1]
    pieces = TEMPLATE_SLOT.split(template.text)  # literal, slot, literal, slot, ..., literal
    literals = [encode_piece(piece) if piece.strip() else [] for piece in pieces[0::2]]
    room = budget - sum(len(ids) for ids in literals)
    if room < len(sentences):
        raise ValueError(f"the prompt {template.text!r} takes {budget - room} of the {budget} text tokens "
                         f"(data.max_text_length): no room for its sentences")
    while sum(len(ids) for ids in sentences) > room:
        longest = max(range(len(sentences)), key=lambda index: len(sentences[index]))
        sentences[longest].pop()
    ids = list(literals[0])
    for slot, literal in zip(pieces[1::2], literals[1:]):
        ids += sentences[int(slot)] + literal
    return ids


def frequent_candidates(ranked_tokens: list[int], size: int, end_token: int | None) -> torch.Tensor:
    """`[size]` candidate token ids for MLM and captioning from a slice's vocabulary (`ranked_tokens`, most
    frequent first, no special token): with `end_token`, that token and the `size - 1` most frequent, so that
    a caption's last query has its end as the answer and generated captions learn to stop (the reference's
    full vocabulary holds it too); with `end_token=None`, the `size` most frequent."""
    if size < 1 or size > len(ranked_tokens):
        raise ValueError(f"a candidate vocabulary of {size} tokens, but the slice has {len(ranked_tokens)}: "
                         f"choose 1 to {len(ranked_tokens)}")
    if end_token is None:
        return torch.tensor(ranked_tokens[:size], dtype=torch.long)
    words = [token for token in ranked_tokens if token != end_token][: size - 1]
    return torch.tensor(words + [end_token], dtype=torch.long)


# --------------------------------------------------------------------------------------------- context
def stored_token_id_tasks(task_names, manifest: dict, tokenizer) -> frozenset:
    """Of `task_names` (tasks reading the bundled slice of `manifest`), those whose rows carry token ids this
    tokenizer made (`TaskContext.token_id_tasks`): all of them when the manifest names this tokenizer's
    fingerprint (`build_data.add_token_ids`), none otherwise."""
    from modeling_uniperceiver_moe.tokenization_uniperceiver_moe import tokenizer_fingerprint

    stored = manifest.get("token_ids_tokenizer")
    if stored is None or not hasattr(tokenizer, "backend_tokenizer") or stored != tokenizer_fingerprint(tokenizer):
        return frozenset()  # no stored ids, a tokenizer without a Rust backend, or another tokenizer
    return frozenset(task_names)


@dataclass
class TaskContext:
    """What batch builders need besides the samples.

    label_names: per task, the class/label texts (classification families).
    vocabulary: `[K]` candidate token ids for MLM and captioning (word targets).
    """

    tokenizer: object
    image_processor: object
    model_config: object
    label_names: dict[str, list[str]] = field(default_factory=dict)
    vocabulary: torch.Tensor | None = None
    max_text_length: int = 32
    mask_probability: float = 0.15
    mlm_corruption: str = "reference"  # how chosen MLM words are hidden: corrupt_masked_words
    seed: int = 0
    workers: int = 0  # threads decoding/resizing images (0 = in the calling thread)
    text_padding: str = "longest"  # a batch's texts padded to its longest, or to `bucket_length` of it
    # tasks whose rows carry the data builder's token ids of their text (`<text_column>_token_ids`, made by
    # this tokenizer: `build_data.add_token_ids`); their batches skip the tokenizer (`stored_token_ids`)
    token_id_tasks: frozenset = frozenset()
    pixel_transport: str = "float32"  # float32: `pixels` are the image processor's normalised floats | uint8:
    # its resized and cropped 8-bit pixels, a quarter of the bytes to hand between processes, pin and copy;
    # the batch's `to` turns them into the processor's floats on the device (`normalise_pixels`)
    _cache: dict = field(default_factory=dict, repr=False)
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def map(self, function, items: list) -> list:
        """`[function(x) for x in items]`, on `workers` threads when set (PIL releases the GIL)."""
        if self.workers <= 1 or len(items) < 4:
            return [function(x) for x in items]
        if "pool" not in self._cache:
            from concurrent.futures import ThreadPoolExecutor

            self._cache["pool"] = ThreadPoolExecutor(self.workers, thread_name_prefix="uniperceiver-data")
        return list(self._cache["pool"].map(function, items))

    def word_end(self) -> torch.Tensor:
        """`[V]` bool: token ends a word (CLIP BPE marks word ends with `</w>`); specials count as words."""
        if "word_end" not in self._cache:
            vocab = self.tokenizer.get_vocab()
            ends = torch.ones(self.model_config.vocab_size, dtype=torch.bool)
            for token, index in vocab.items():
                if index < len(ends) and not token.endswith("</w>") and not token.startswith("<|") and not token.startswith("["):
                    ends[index] = False
            self._cache["word_end"] = ends
        return self._cache["word_end"]

    def vocabulary_index(self) -> torch.Tensor:
        """`[V]` long: position of each token in `vocabulary`, -100 when it is not a candidate."""
        if "vocab_index" not in self._cache:
            if self.vocabulary is None:
                raise ValueError("MLM/captioning tasks need a candidate vocabulary (the data manifest provides one)")
            index = torch.full((self.model_config.vocab_size,), -100, dtype=torch.long)
            index[self.vocabulary] = torch.arange(len(self.vocabulary))
            self._cache["vocab_index"] = index
        return self._cache["vocab_index"]

    def word_targets(self) -> dict[str, torch.Tensor]:
        """The vocabulary encoded as `[SPE] w [EOS]` target sequences: ids `[K, 2]` (SPE is added by the model),
        and the token each candidate is (`candidate_token_ids` `[K]`, for the model's word bias)."""
        if "word_targets" not in self._cache:
            eos = self.model_config.eos_token_id
            ids = torch.stack([self.vocabulary, torch.full_like(self.vocabulary, eos)], dim=1)
            self._cache["word_targets"] = {"target_input_ids": ids, "target_attention_mask": torch.ones_like(ids),
                                           "candidate_token_ids": self.vocabulary}
        return self._cache["word_targets"]

    def label_targets(self, task: Task) -> dict[str, torch.Tensor]:
        key = ("labels", task.name)
        if key not in self._cache:
            names = self.label_names.get(task.name)
            if not names:
                raise ValueError(f"task {task.name!r} needs label names (the data manifest provides them)")
            encoded = self.tokenize(names, bucketed=False)  # the same for every batch of the task
            self._cache[key] = {"target_input_ids": encoded["input_ids"],
                                "target_attention_mask": encoded["attention_mask"]}
        return self._cache[key]

    @property
    def has_start_token(self) -> bool:
        """Texts start with the model config's `bos_token_id`; without one (the reference's texts) with their
        first word."""
        return self.model_config.bos_token_id is not None

    def stored_token_ids(self, task: "Task", samples: list[dict]) -> list | None:
        """The samples' stored token ids of `task.text_column` (`token_id_tasks`), or None when the task's
        rows carry none (the texts are then tokenised)."""
        if task.name not in self.token_id_tasks:
            return None
        ids = [sample.get(f"{task.text_column}_token_ids") for sample in samples]
        return None if any(row is None for row in ids) else ids

    def tokenize(self, texts: list[str], bucketed: bool = True, token_ids: list | None = None) -> dict[str, torch.Tensor]:
        """Padded ids and mask `[N, T]`, each text `[bos] words [eos]` (no `[bos]` when the model config has
        none); T is the longest text, or with `text_padding="buckets"` (and `bucketed`) `bucket_length` of
        it. With `token_ids` (the texts' `stored_token_ids`) the same rows are packed from them without the
        tokenizer. Serialised: a Rust tokenizer used from two threads at once (a prefetch thread and an
        evaluation) can fail with "Already borrowed"."""
        from modeling_uniperceiver_moe.tokenization_uniperceiver_moe import encode_texts, pack_text_ids

        if token_ids is not None:
            encoded = pack_text_ids(token_ids, self.tokenizer.bos_token_id if self.has_start_token else None,
                                    self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.max_text_length)
        else:
            with self._tokenizer_lock:
                encoded = encode_texts(self.tokenizer, texts, self.has_start_token, max_length=self.max_text_length)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        extra = self.bucket(ids.shape[1], self.max_text_length) - ids.shape[1] if bucketed else 0
        if not extra:
            return encoded
        return {"input_ids": F.pad(ids, (0, extra), value=self.tokenizer.pad_token_id),
                "attention_mask": F.pad(mask, (0, extra), value=0)}

    def prompt(self, template: TextTemplate, sentences: list[str]) -> list[int]:
        """One row's prompt: `[bos]` (when the model has one), then `render_template` within
        `max_text_length` tokens."""
        from modeling_uniperceiver_moe.tokenization_uniperceiver_moe import clean_text

        tokenizer, start = self.tokenizer, [self.model_config.bos_token_id] if self.has_start_token else []

        def encode(text: str) -> list[int]:
            return tokenizer(clean_text(text), add_special_tokens=False)["input_ids"]

        with self._tokenizer_lock:
            return start + render_template(template, [encode(sentence) for sentence in sentences], encode,
                                           tokenizer.convert_tokens_to_ids(".</w>"), self.max_text_length - len(start))

    def bucket(self, length: int, limit: int) -> int:
        """`length` itself, or its `bucket_length` under `text_padding="buckets"`."""
        return bucket_length(length, limit) if self.text_padding == "buckets" else length

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """`[N, C, H, W]`: float32 normalised, or uint8 under `pixel_transport="uint8"`; chunks of the list are
        processed on the worker threads."""
        if self.pixel_transport not in PIXEL_TRANSPORTS:
            raise ValueError(f"pixel transport must be one of {PIXEL_TRANSPORTS}, got {self.pixel_transport!r}")
        options = {"do_rescale": False, "do_normalize": False} if self.pixel_transport == "uint8" else {}

        def process(chunk: list[Image.Image]) -> torch.Tensor:
            return self.image_processor(chunk, return_tensors="pt", **options)["pixel_values"]

        if self.workers <= 1 or len(images) < 8:
            pixels = process(images)
        else:
            step = -(-len(images) // self.workers)
            pixels = torch.cat(self.map(process, [images[i:i + step] for i in range(0, len(images), step)]))
        if self.pixel_transport == "uint8" and pixels.dtype != torch.uint8:
            raise TypeError(f"{type(self.image_processor).__name__} gave {pixels.dtype} pixels without rescaling; "
                            "data.pixel_transport=uint8 needs its 8-bit pixels (use float32)")
        return pixels

    def pixel_table(self) -> torch.Tensor | None:
        """`[C, 256]` float32: the image processor's output for each 8-bit level of each channel, which
        `normalise_pixels` looks this context's uint8 pixels up in; None when the pixels are already floats.
        Taken from the processor itself (an image holding every level once, its resize and crop off), so
        the lookup gives exactly the floats the processor would, whichever backend computes them."""
        if self.pixel_transport != "uint8":
            return None
        if "pixel_table" not in self._cache:
            levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
            image = Image.fromarray(np.stack([levels] * 3, axis=-1), mode="RGB")
            floats = self.image_processor([image], do_resize=False, do_center_crop=False,
                                          return_tensors="pt")["pixel_values"][0]
            self._cache["pixel_table"] = floats.reshape(floats.shape[0], 256).float().contiguous()
        return self._cache["pixel_table"]


PIXEL_TRANSPORTS = ("float32", "uint8")


def normalise_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 pixels `[..., C, H, W]` -> float32 of the same shape on their device: channel c's level v
    becomes `table[c, v]` (`TaskContext.pixel_table`, `[C, 256]`)."""
    channels = table.shape[0]
    if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-3] != channels:
        raise ValueError(f"expected uint8 pixels [..., {channels}, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    offsets = torch.arange(0, channels * 256, 256, device=pixels.device).view(channels, 1, 1)
    return table.to(pixels.device, non_blocking=True).view(-1)[pixels.long() + offsets]


HOST_ROUTE_INPUTS = ("attribute_vectors", "task_ids", "target_attribute_vectors", "target_task_ids")  # model inputs
# read only to group the tokens by route key (`TaskBatch.to` leaves them on the host)


@dataclass
class TaskBatch:
    """A built batch: `inputs` go to `UniPerceiverMoEForGenericPerception.forward`; `labels` index candidates
    (-100 = ignore); `num_tokens` = the number of tokens the loss runs over (samples or masked tokens)."""

    task: Task
    inputs: dict
    labels: torch.Tensor
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    data_state: dict | None = None
    pixel_table: torch.Tensor | None = None  # `pixel_values` are uint8, which `to` looks up in this table

    def pin_memory(self) -> "TaskBatch":
        """The batch with its tensors in page-locked host memory, so that `to(cuda)` copies without blocking."""
        pinned = {k: v.pin_memory() if torch.is_tensor(v) and k not in HOST_ROUTE_INPUTS else v
                  for k, v in self.inputs.items()}  # route inputs stay on the host (`to`)
        table = None if self.pixel_table is None else self.pixel_table.pin_memory()
        return replace(self, inputs=pinned, labels=self.labels.pin_memory(), pixel_table=table)

    def to(self, device) -> "TaskBatch":
        """The batch on `device`, except its route inputs (`HOST_ROUTE_INPUTS`), which stay on the host: the
        model groups host route keys without reading the accelerator back (`route_key_tables`), so the host
        does not wait for the previous step's work at the start of each step."""
        device = torch.device(device)
        non_blocking = device.type == "cuda"
        moved = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) and k not in HOST_ROUTE_INPUTS else v
                 for k, v in self.inputs.items()}
        if self.pixel_table is not None and torch.is_tensor(moved.get("pixel_values")):
            moved["pixel_values"] = normalise_pixels(moved["pixel_values"],
                                                     self.pixel_table.to(device, non_blocking=non_blocking))
        return replace(self, inputs=moved, labels=self.labels.to(device, non_blocking=non_blocking),
                       pixel_table=None)


# --------------------------------------------------------------------------------------------- sample checks
def sample_name(sample: dict) -> str:
    return str(sample.get("key", sample.get("idx", "?")))


def decode_image(value) -> Image.Image:
    """A datasets Image cell (dict with bytes/path, raw bytes or a PIL image) -> RGB PIL image."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            raise MalformedSample(f"no image data ({type(value).__name__})")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise MalformedSample(f"cannot decode image ({type(error).__name__})") from None
    if image.width < 1 or image.height < 1:
        raise MalformedSample("empty image")
    return image.convert("RGB")


def try_decode(value):
    """`decode_image` that returns the MalformedSample instead of raising it (for thread pools)."""
    try:
        return decode_image(value)
    except MalformedSample as error:
        return error


def require_text(sample: dict, column: str) -> str:
    text = sample.get(column)
    if not isinstance(text, str) or not text.strip():
        raise MalformedSample(f"empty or missing text in column {column!r}")
    return text


def require_label(sample: dict, num_labels: int) -> int:
    label = sample.get("label")
    if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < num_labels:
        raise MalformedSample(f"label {label!r} outside [0, {num_labels})")
    return int(label)


def sample_rng(ctx: TaskContext, task: Task, sample: dict, epoch: int) -> np.random.Generator:
    """Per-sample randomness (e.g. MLM masks) from (seed, task, epoch, sample key): the same in any
    process layout and after resumption."""
    digest = hashlib.sha1(f"{ctx.seed}/{task.name}/{epoch}/{sample_name(sample)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def attribute_rows(attributes: TokenAttributes, batch: int) -> torch.Tensor:
    """`[batch, A]`, one attribute row for every sequence or candidate, as a broadcast view (stride 0): a packed
    batch carries the one row, and a large one is read for routing at the cost of that row
    (`routing.repeated_slices_cut`)."""
    return attributes.to_tensor().expand(batch, -1)


def route_inputs(task: Task, batch: int, attributes: torch.Tensor, target_attributes: TokenAttributes | None,
                 num_targets: int | None) -> dict:
    """Router inputs of both sides: attribute vectors and task ids (modality ids are derived by the model)."""
    out = {"attribute_vectors": attributes, "task_ids": torch.full((batch,), task.task_id, dtype=torch.long)}
    if num_targets is not None:
        target = target_attributes or task.target_attributes
        out["target_attribute_vectors"] = attribute_rows(target, num_targets)
        out["target_task_ids"] = torch.full((num_targets,), task.task_id, dtype=torch.long)
    return out


def augment_frames(frames: list[Image.Image], rng: np.random.Generator, min_side: float = 0.85) -> list[Image.Image]:
    """Training-time augmentation of one image or clip (the same for every frame of a clip): a crop of
    `min_side`..100% of each side at a random place, then a horizontal mirror with probability 1/2. The
    processor resizes the crop to the model's image size."""
    width, height = frames[0].size
    crop_w = max(1, int(round(width * rng.uniform(min_side, 1.0))))
    crop_h = max(1, int(round(height * rng.uniform(min_side, 1.0))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    mirror = bool(rng.random() < 0.5)
    out = []
    for frame in frames:
        frame = frame.crop((left, top, left + crop_w, top + crop_h))
        out.append(frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else frame)
    return out


# --------------------------------------------------------------------------------------------- builders
def build_classification(task: Task, samples: list[dict], ctx: TaskContext, epoch: int, video: bool,
                         augment: bool = False) -> TaskBatch:
    names = ctx.label_names.get(task.name) or []
    visuals, labels, skipped = [], [], []
    if video:
        flat = [f for sample in samples for f in (sample.get("frames") or [])]
        decoded_flat, decoded, at = ctx.map(try_decode, flat), [], 0
        for sample in samples:
            count = len(sample.get("frames") or [])
            decoded.append(decoded_flat[at:at + count])
            at += count
    else:
        decoded = ctx.map(try_decode, [sample.get("image") for sample in samples])
    for sample, visual in zip(samples, decoded):
        try:
            if video:
                if not visual:
                    raise MalformedSample("video without frames")
                if len(visual) > ctx.model_config.num_frames:
                    raise MalformedSample(f"{len(visual)} frames > num_frames={ctx.model_config.num_frames}")
                for frame in visual:
                    if isinstance(frame, MalformedSample):
                        raise frame
            elif isinstance(visual, MalformedSample):
                raise visual
            label = require_label(sample, len(names))
        except MalformedSample as error:
            skipped.append((sample_name(sample), str(error)))
            continue
        if augment:
            frames = augment_frames(visual if video else [visual], sample_rng(ctx, task, sample, epoch))
            visual = frames if video else frames[0]
        visuals.append(visual)
        labels.append(label)
    if video:
        lengths = {len(v) for v in visuals}
        if len(lengths) > 1:  # pad shorter clips by repeating their last frame
            longest = max(lengths)
            visuals = [v + [v[-1]] * (longest - len(v)) for v in visuals]
        pixels = ctx.pixels([f for v in visuals for f in v]) if visuals else torch.zeros(0)
        pixels = pixels.reshape(len(visuals), -1, *pixels.shape[1:]) if visuals else pixels
    else:
        pixels = ctx.pixels(visuals) if visuals else torch.zeros(0)
    targets = ctx.label_targets(task)
    inputs = {"pixel_values": pixels, **targets,
              **route_inputs(task, len(labels), attribute_rows(task.input_attributes, len(labels)), None,
                             len(targets["target_input_ids"]))}
    return TaskBatch(task, inputs, torch.tensor(labels, dtype=torch.long), len(labels), skipped)


def build_text_classification(task: Task, samples: list[dict], ctx: TaskContext, epoch: int) -> TaskBatch:
    if task.template is not None:
        return build_prompted_text_classification(task, samples, ctx)
    names = ctx.label_names.get(task.name) or []
    texts, labels, kept, skipped = [], [], [], []
    for sample in samples:
        try:
            text, label = require_text(sample, task.text_column), require_label(sample, len(names))
        except MalformedSample as error:
            skipped.append((sample_name(sample), str(error)))
            continue
        texts.append(text)
        labels.append(label)
        kept.append(sample)
    spe = ctx.model_config.spe_token_id
    encoded = ctx.tokenize(texts, token_ids=ctx.stored_token_ids(task, kept))
    ids, mask = append_query_token(encoded["input_ids"], encoded["attention_mask"], spe, ctx.max_text_length)
    query = (mask.sum(1) - 2).clamp(min=0)[:, None]  # the [SPE] sits just before the end token
    targets = ctx.label_targets(task)
    inputs = {"input_ids": ids, "attention_mask": mask, "query_positions": query, **targets,
              **route_inputs(task, len(labels), attribute_rows(task.input_attributes, len(labels)), None,
                             len(targets["target_input_ids"]))}
    return TaskBatch(task, inputs, torch.tensor(labels, dtype=torch.long)[:, None], len(labels), skipped)


def build_prompted_text_classification(task: Task, samples: list[dict], ctx: TaskContext) -> TaskBatch:
    """Each row's sentences in the task's `TextTemplate`; the query is the prompt's [SPE]."""
    template, spe = task.template, ctx.model_config.spe_token_id
    prompts, labels, skipped = [], [], []
    for sample in samples:
        try:
            sentences = [require_text(sample, column) for column in template.columns]
            label = require_label(sample, len(template.label_words))
        except MalformedSample as error:
            skipped.append((sample_name(sample), str(error)))
            continue
        prompts.append(ctx.prompt(template, sentences))
        labels.append(label)
    length = ctx.bucket(max((len(ids) for ids in prompts), default=1), ctx.max_text_length)
    ids = torch.full((len(prompts), length), ctx.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
        mask[row, :len(prompt)] = 1
    query = torch.tensor([[prompt.index(spe)] for prompt in prompts], dtype=torch.long).reshape(-1, 1)
    targets = ctx.label_targets(task)
    inputs = {"input_ids": ids, "attention_mask": mask, "query_positions": query, **targets,
              **route_inputs(task, len(labels), attribute_rows(task.input_attributes, len(labels)), None,
                             len(targets["target_input_ids"]))}
    return TaskBatch(task, inputs, torch.tensor(labels, dtype=torch.long)[:, None], len(labels), skipped)


def append_query_token(ids: torch.Tensor, mask: torch.Tensor, token: int, max_length: int):
    """Insert `token` before each sequence's end token (truncating the text to fit `max_length`)."""
    lengths = mask.sum(1)
    out_len = min(ids.shape[1] + 1, max_length)
    out = torch.full((ids.shape[0], out_len), int(ids[0, -1]) if ids.numel() else 0, dtype=ids.dtype)
    out_mask = torch.zeros(ids.shape[0], out_len, dtype=mask.dtype)
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        body = ids[row, : n - 1][: out_len - 2]  # everything before the end token
        seq = torch.cat([body, torch.tensor([token, int(ids[row, n - 1])], dtype=ids.dtype)])
        out[row, : len(seq)] = seq
        out_mask[row, : len(seq)] = 1
    return out, out_mask


def masked_word_spans(ids, word_end, probability: float, rng: np.random.Generator,
                      first: int = 1) -> list[tuple[int, int]]:
    """Choose `probability` of the words (at least one) of a `[bos] tokens [eos]` sequence `ids` `[T]` (`first`
    = 1) or of a `tokens [eos]` one (`first` = 0), given `word_end` `[V]` (bool, token ends a word; arrays or
    CPU tensors): the chosen words' `(start, end)` token spans, in sequence order. A word ends at a word-end
    token or at the last token before `[eos]`."""
    ids, word_end = np.asarray(ids), np.asarray(word_end)
    last = len(ids) - 1  # the [eos] position: words lie in [first, last)
    if last <= first:
        return []
    ends = np.flatnonzero(word_end[ids[first:last]]) + first + 1  # exclusive ends
    if len(ends) == 0 or ends[-1] != last:
        ends = np.append(ends, last)
    starts = np.concatenate(([first], ends[:-1]))
    count = max(1, int(round(probability * len(ends))))
    chosen = np.sort(rng.choice(len(ends), size=min(count, len(ends)), replace=False))
    return [(int(starts[w]), int(ends[w])) for w in chosen]


MLM_CORRUPTIONS = ("reference", "mask_token")  # how `build_mlm` hides the chosen words


def corrupt_masked_words(ids: np.ndarray, spans: list[tuple[int, int]], mask_symbol: int, replace_some: bool,
                         random_below: int, rng: np.random.Generator) -> None:
    """Hide the chosen words of `ids` `[T]` in place: every token by `mask_symbol`, or with `replace_some` (the
    reference's training corruption) per word 80% of the time by `mask_symbol`, 10% by random tokens (ids
    below `random_below`) and 10% left as they are."""
    for start, end in spans:
        draw = rng.random() if replace_some else 0.0
        if draw < 0.8:
            ids[start:end] = mask_symbol
        elif draw < 0.9:
            ids[start:end] = rng.integers(0, random_below, end - start)


def build_mlm(task: Task, samples: list[dict], ctx: TaskContext, epoch: int, training: bool = False) -> TaskBatch:
    """Whole-word masked-language modelling. `ctx.mlm_corruption` "reference" hides the chosen words with
    <|spe|> (80/10/10 in training batches, every token in evaluation), "mask_token" with [MASK] always."""
    texts, kept, skipped = [], [], []
    for sample in samples:
        try:
            texts.append(require_text(sample, task.text_column))
            kept.append(sample)
        except MalformedSample as error:
            skipped.append((sample_name(sample), str(error)))
    encoded = ctx.tokenize(texts, token_ids=ctx.stored_token_ids(task, kept))
    ids, mask = encoded["input_ids"].clone(), encoded["attention_mask"]
    rows, lengths = ids.numpy(), mask.sum(1).tolist()  # `rows` shares `ids`' memory: corrupted in place
    vocab_index, word_end = ctx.vocabulary_index().numpy(), ctx.word_end().numpy()
    reference = ctx.mlm_corruption == "reference"
    symbol = ctx.model_config.spe_token_id if reference else ctx.model_config.mask_token_id
    queries, labels = [], []
    for row, sample in enumerate(kept):
        rng = sample_rng(ctx, task, sample, epoch)
        spans = masked_word_spans(rows[row, : lengths[row]], word_end, ctx.mask_probability, rng,
                                  first=int(ctx.has_start_token))
        positions = np.array([p for start, end in spans for p in range(start, end)], dtype=np.int64)
        labels.append(vocab_index[rows[row, positions]])
        queries.append(positions)
        # random replacements are drawn from the CLIP BPE ids (those below [MASK]), as in the reference
        corrupt_masked_words(rows[row], spans, symbol, reference and training, ctx.model_config.mask_token_id, rng)
    width = ctx.bucket(max((len(q) for q in queries), default=1) or 1, ids.shape[1])
    query_positions = np.full((len(kept), width), -1, dtype=np.int64)
    label_rows = np.full((len(kept), width), -100, dtype=np.int64)
    for row, (q, l) in enumerate(zip(queries, labels)):
        query_positions[row, : len(q)] = q
        label_rows[row, : len(l)] = l
    query_positions, label_tensor = torch.from_numpy(query_positions), torch.from_numpy(label_rows)
    targets = ctx.word_targets()
    inputs = {"input_ids": ids, "attention_mask": mask, "query_positions": query_positions, **targets,
              **route_inputs(task, len(kept), attribute_rows(task.input_attributes, len(kept)), None,
                             len(targets["target_input_ids"]))}
    return TaskBatch(task, inputs, label_tensor, len(kept), skipped)


def image_text_pairs(task: Task, samples: list[dict], ctx: TaskContext) -> tuple[list, list[str], list | None,
                                                                                list[tuple[str, str]]]:
    """The decodable images and their texts (with the texts' `stored_token_ids`), and the samples skipped."""
    images, texts, kept, skipped = [], [], [], []
    decoded = ctx.map(try_decode, [sample.get("image") for sample in samples])
    for sample, image in zip(samples, decoded):
        try:
            if isinstance(image, MalformedSample):
                raise image
            text = require_text(sample, task.text_column)
        except MalformedSample as error:
            skipped.append((sample_name(sample), str(error)))
            continue
        images.append(image)
        texts.append(text)
        kept.append(sample)
    return images, texts, ctx.stored_token_ids(task, kept), skipped


def caption_attributes(task: Task, batch: int, num_prefix: int, num_words: int) -> torch.Tensor:
    """`[B, L, A]`: SPE + image tokens get the image segment's attributes, words + placeholders the text's."""
    image = ATTRIBUTES["caption_image"].to_tensor()
    text = ATTRIBUTES["caption_text"].to_tensor()
    rows = torch.cat([image.expand(num_prefix, -1), text.expand(2 * num_words, -1)])
    return rows.expand(batch, -1, -1)  # the same rows for every sequence: a broadcast view, like `attribute_rows`


def build_captioning(task: Task, samples: list[dict], ctx: TaskContext, epoch: int) -> TaskBatch:
    images, texts, token_ids, skipped = image_text_pairs(task, samples, ctx)
    encoded = ctx.tokenize(texts, token_ids=token_ids)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ctx.vocabulary_index()[ids].masked_fill(mask == 0, -100)
    if ctx.has_start_token:
        labels[:, 0] = -100  # q_0 would predict the start token; without one it predicts the first word
    pixels = ctx.pixels(images)
    grid = (pixels.shape[-1] // ctx.model_config.patch_size) * (pixels.shape[-2] // ctx.model_config.patch_size)
    targets = ctx.word_targets()
    attributes = caption_attributes(task, len(texts), 1 + grid, ids.shape[1])
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "caption_mode": True, **targets,
              **route_inputs(task, len(texts), attributes, None, len(targets["target_input_ids"]))}
    return TaskBatch(task, inputs, labels, len(texts), skipped)


def build_retrieval(task: Task, samples: list[dict], ctx: TaskContext, epoch: int) -> TaskBatch:
    images, texts, token_ids, skipped = image_text_pairs(task, samples, ctx)
    encoded = ctx.tokenize(texts, token_ids=token_ids)
    inputs = {"pixel_values": ctx.pixels(images), "target_input_ids": encoded["input_ids"],
              "target_attention_mask": encoded["attention_mask"],
              **route_inputs(task, len(texts), attribute_rows(task.input_attributes, len(texts)), None, len(texts))}
    return TaskBatch(task, inputs, torch.arange(len(texts)), len(texts), skipped)


FAMILY_BUILDERS: dict[str, Callable[..., TaskBatch]] = {
    "image_classification": lambda t, s, c, e, **kw: build_classification(t, s, c, e, video=False, **kw),
    "video_classification": lambda t, s, c, e, **kw: build_classification(t, s, c, e, video=True, **kw),
    "text_classification": build_text_classification,
    "mlm": build_mlm,
    "captioning": build_captioning,
    "retrieval": build_retrieval,
}
TOKEN_LEVEL_FAMILIES = ("mlm", "captioning", "text_classification")


def candidate_inputs(task: Task, ctx: TaskContext) -> dict[str, torch.Tensor]:
    """The `target_*` model inputs of a task whose candidates are the same for every batch
    (`SHARED_CANDIDATE_FAMILIES`): its class names or label words, or the vocabulary words, with their
    attribute rows and task ids, as its batches carry them."""
    if task.family in ("mlm", "captioning"):
        targets = {key: value for key, value in ctx.word_targets().items() if key.startswith("target_")}
    else:
        targets = dict(ctx.label_targets(task))
    count = len(targets["target_input_ids"])
    return {**targets, "target_attribute_vectors": attribute_rows(task.target_attributes, count),
            "target_task_ids": torch.full((count,), task.task_id, dtype=torch.long)}


SHARED_CANDIDATE_FAMILIES = ("image_classification", "video_classification", "text_classification", "mlm",
                             "captioning")  # candidates the same for every batch of a task (not retrieval's pairs)
AUGMENTED_FAMILIES = ("image_classification", "video_classification")  # `augment_frames` in training


def build_batch(task: Task, samples: list[dict], ctx: TaskContext, epoch: int, augment: bool = False,
                training: bool = False) -> TaskBatch:
    """Samples (raw rows of the task's source) -> a `TaskBatch`; malformed samples are listed in `skipped`.
    augment: training batches of `AUGMENTED_FAMILIES` get `augment_frames`, drawn per (seed, task, epoch,
    sample) so that resumption and any process layout see the same crops. training: a training batch (MLM
    then corrupts as the reference trains, `build_mlm`)."""
    options = {}  # only the builders that take an option get it
    if augment and task.family in AUGMENTED_FAMILIES:
        options["augment"] = True
    if training and task.family == "mlm":
        options["training"] = True
    batch = FAMILY_BUILDERS[task.family](task, samples, ctx, epoch, **options)
    pixels = batch.inputs.get("pixel_values")
    if torch.is_tensor(pixels) and pixels.dtype == torch.uint8:
        batch.pixel_table = ctx.pixel_table()  # normalised by `to`
    return batch


# --------------------------------------------------------------------------------------------- loss
class _GatherRows(torch.autograd.Function):
    """All-gather along rows with a gradient: each process's `[n, ...]` -> `[world * n, ...]` in rank order;
    backward sums the gathered gradient over processes and returns this process's rows (an all-reduce, which
    every backend has, where NCCL alone would reduce-scatter)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        gradient = gradient.contiguous().clone()
        dist.all_reduce(gradient)
        return gradient[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """`[n, ...]` of every process -> `[world * n, ...]`, differentiable (the model's `CandidateShard.gather`)."""
    return _GatherRows.apply(rows)


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather `[b, ...]` across processes keeping gradients; returns (`[W*b, ...]`, this rank's offset)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    return gather_rows(tensor), dist.get_rank() * tensor.shape[0]


def global_count(count: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        return count / dist.get_world_size()
    return count


def task_loss(batch: TaskBatch, output, label_smoothing: float, across_processes: bool = True) -> torch.Tensor:
    """Candidate cross-entropy of one task batch (+ the router aux loss).

    across_processes (every process runs this task, `data.task_sampling: shared`): normalised over the
    global batch, each process returning sum(local losses) / (global count / world size), and retrieval
    scores each pair against every process's pairs; averaging the processes' gradients (DDP) then gives
    exactly the gradient of the global mean. Otherwise (`per_process`, the reference) the mean over this
    process's batch, with no collective: the other processes may be running other tasks.
    """
    gather = gather_with_grad if across_processes else (lambda tensor: (tensor, 0))
    if batch.task.family == "retrieval":
        images, image_offset = gather(output.input_features)
        texts, _ = gather(output.target_features)
        scale = output.logit_scale
        local = torch.arange(output.input_features.shape[0], device=images.device) + image_offset
        loss = symmetric_cross_entropy(scale * output.input_features @ texts.t(),
                                       scale * output.target_features.float() @ images.t(), local, label_smoothing)
    else:
        logits = output.logits.reshape(-1, output.logits.shape[-1])
        labels = batch.labels.reshape(-1).to(logits.device)
        total = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
        count = (labels != -100).sum().float()
        loss = total / (global_count(count) if across_processes else count).clamp(min=1.0)
    if output.aux_loss is not None:
        loss = loss + output.aux_loss
    return loss


# --------------------------------------------------------------------------------------------- the registry
for _task in (
    Task("fashion_mnist_classification", "image_classification", "fashion_mnist", 0, 1.0,
         input_attributes=ATTRIBUTES["classification_input"], target_attributes=ATTRIBUTES["class_name_target"]),
    Task("video_clip_classification", "video_classification", "video_clips", 1, 0.1,
         input_attributes=ATTRIBUTES["classification_input"], target_attributes=ATTRIBUTES["class_name_target"]),
    Task("austen_mlm", "mlm", "austen", 2, 0.5,
         input_attributes=ATTRIBUTES["text_input"], target_attributes=ATTRIBUTES["word_target"]),
    Task("kjv_mlm", "mlm", "kjv", 3, 0.5,
         input_attributes=ATTRIBUTES["text_input"], target_attributes=ATTRIBUTES["word_target"]),
    Task("emoji_captioning", "captioning", "emoji", 4, 1.0, text_column="caption",
         target_attributes=ATTRIBUTES["word_target"]),
    Task("emoji_retrieval", "retrieval", "emoji", 5, 0.5, text_column="caption",
         input_attributes=ATTRIBUTES["retrieval_image"], target_attributes=ATTRIBUTES["retrieval_text_target"]),
    Task("openclipart_captioning", "captioning", "openclipart", 6, 1.0, text_column="caption",
         target_attributes=ATTRIBUTES["word_target"]),
    Task("openclipart_retrieval", "retrieval", "openclipart", 7, 0.5, text_column="caption",
         input_attributes=ATTRIBUTES["retrieval_image"], target_attributes=ATTRIBUTES["retrieval_text_target"]),
    Task("wordnet_lexname_classification", "text_classification", "wordnet", 8, 1.0,
         input_attributes=ATTRIBUTES["text_input"], target_attributes=ATTRIBUTES["word_target"]),
    # not in any pre-training config: a task the pre-trained model has never seen (its Unicode group from an
    # emoji's image), for prompt tuning and zero-shot evaluation
    Task("emoji_group_classification", "image_classification", "emoji", 9, 1.0,
         input_attributes=ATTRIBUTES["classification_input"], target_attributes=ATTRIBUTES["class_name_target"]),
):
    register(_task)

# GLUE, in the reference's prompts and label words; rows as the Hub's `nyu-mll/glue` has them (its column
# names and label ids: RTE, QNLI and MNLI number entailment 0, so their words run "yes" first). No GLUE
# data is bundled: a config gives the source, e.g.
#   tasks: {glue_sst2: {source: {hub: nyu-mll/glue, config: sst2, split: train, eval: {split: validation}}}}
GLUE_TEMPLATES = {
    "glue_sst2": TextTemplate("{0} <|endoftext|> it is [SPE] . <|endoftext|>", ("sentence",), ("bad", "wonderful")),
    "glue_cola": TextTemplate("{0} this is [SPE] . <|endoftext|>", ("sentence",), ("incorrect", "correct")),
    "glue_rte": TextTemplate("{0} ? <|endoftext|> it is [SPE] , {1} <|endoftext|>", ("sentence1", "sentence2"),
                             ("yes", "no"), drop_final_period=True),
    "glue_mrpc": TextTemplate("{0} . [SPE] , {1} <|endoftext|>", ("sentence1", "sentence2"), ("no", "yes"),
                              drop_final_period=True),
    "glue_qqp": TextTemplate("{0} <|endoftext|> [SPE] , {1} <|endoftext|>", ("question1", "question2"),
                             ("no", "yes"), drop_final_period=True),
    "glue_qnli": TextTemplate("{0} <|endoftext|> it is [SPE] , {1} <|endoftext|>", ("question", "sentence"),
                              ("yes", "no"), drop_final_period=True),
    "glue_mnli": TextTemplate("{0} [SPE] , {1} <|endoftext|>", ("premise", "hypothesis"), ("yes", "maybe", "no")),
}
for _task_id, (_name, _template) in enumerate(GLUE_TEMPLATES.items(), start=10):
    register(Task(_name, "text_classification", "glue", _task_id, 1.0, input_attributes=ATTRIBUTES["text_input"],
                  target_attributes=ATTRIBUTES["word_target"], template=_template))
