"""CLIP byte-level BPE tokenizer built offline from the vocabulary file that `open-clip-torch` ships.

The 49,408 CLIP tokens (ids match open_clip's) plus three specials appended after them:
`[MASK]` 49408, `[GEN]` 49409, `[SPE]` 49410 (vocab 49,411, as in Uni-Perceiver). The result is a
regular `transformers.CLIPTokenizer`: `save_pretrained` writes it next to the model and
`AutoTokenizer.from_pretrained(ckpt)` reloads it with no network.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("[MASK]", "[GEN]", "[SPE]")
CLIP_VOCAB_SIZE = 49408
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def find_open_clip_bpe_file() -> str:
    """Path of open_clip's BPE merges file, found without importing open_clip (no torchvision needed)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the CLIP BPE vocabulary ships inside open-clip-torch: `pip install --no-deps open-clip-torch`"
        )
    path = os.path.join(os.path.dirname(spec.origin), BPE_FILE_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed open-clip-torch")
    return path


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def load_clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's `vocab` (token -> id) and `merges` from the gzipped merges list."""
    with gzip.open(bpe_path or find_open_clip_bpe_file(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"rebuilt CLIP vocabulary has {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}, merges


def clean_text(text: str) -> str:
    """open_clip's cleaning: ftfy repair (when installed), HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).strip()


def encode_texts(tokenizer, texts: list[str], add_bos_token: bool = True, max_length: int | None = None,
                 padding=True, truncation=True, return_tensors="pt", **kwargs):
    """Cleaned `texts` -> the tokenizer's `BatchEncoding` (`input_ids`, `attention_mask` `[N, T]`), every text
    ending with `<|endoftext|>`; `add_bos_token=False` drops the `<|startoftext|>` that CLIP's template puts
    first (the reference's texts start with their first word). `max_length` counts the tokens kept either way.
    """
    texts = [clean_text(t) for t in texts]
    if add_bos_token:
        return tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length,
                         return_tensors=return_tensors, **kwargs)
    encoded = tokenizer(texts, padding=padding, truncation=truncation,
                        max_length=None if max_length is None else max_length + 1, return_tensors=return_tensors, **kwargs)
    for key in ("input_ids", "attention_mask"):  # the template puts the start token first in every row
        encoded[key] = encoded[key][:, 1:] if return_tensors else [row[1:] for row in encoded[key]]
    return encoded


def text_body_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each cleaned text's token ids without the start and end tokens and untruncated: what
    `pack_text_ids` turns into `encode_texts`' rows (the data builder stores them beside the texts)."""
    if not texts:  # the tokenizer fails on an empty batch
        return []
    return tokenizer([clean_text(t) for t in texts], add_special_tokens=False)["input_ids"]


def pack_text_ids(bodies: list, start_id: int | None, end_id: int, pad_id: int, max_length: int):
    """`encode_texts`' padded ids and mask `[N, T]` from texts' `text_body_ids`: each row `[start] body
    [end]` (no start token when `start_id` is None), the body cut so the row holds at most `max_length`
    tokens, as the tokenizer truncates; T is the longest row."""
    import torch

    start = [] if start_id is None else [start_id]
    keep = max(0, max_length - len(start) - 1)
    rows = [start + list(body[:keep]) + [end_id] for body in bodies]
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary, merges and text normalisation: stored token ids are used
    only by a tokenizer with the same fingerprint."""
    import hashlib
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    # what maps a text to ids; not the truncation and padding settings, which change with each call
    kept = {key: state.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def build_uniperceiver_tokenizer(bpe_path: str | None = None, model_max_length: int = 512) -> CLIPTokenizer:
    """A `CLIPTokenizer` over CLIP's 49,408 tokens plus `[MASK]`, `[GEN]`, `[SPE]` (ids 49408..49410)."""
    vocab, merges = load_clip_vocab_and_merges(bpe_path)
    try:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    except TypeError:  # transformers 4.x takes files only
        raise RuntimeError("build_uniperceiver_tokenizer needs transformers >= 5")
    tokenizer.add_special_tokens({"mask_token": "[MASK]", "additional_special_tokens": ["[GEN]", "[SPE]"]})
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 49408..49410")
    return tokenizer
