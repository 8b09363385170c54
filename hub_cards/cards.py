"""Model cards for Uni-Perceiver-MoE checkpoints, built from the checkpoint folder and its measured results.

Three artefacts, one template each (`hub_cards/templates.py`):

* `model`: a pre-trained checkpoint (`config.json` + weights, e.g. `outputs/pretrain-tiny/final/`); results
  come from the pre-training `report.json` (found in the folder or its parent, or given explicitly);
* `adapter`: a prompt-tuning PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`, e.g.
  `outputs/prompt-tuning/<task>-prompt/adapter/`); results come from that run's `results.json`;
* `folded`: a merged dense export written by `fold_experts` (`config.json` with `folded_routes`).

The card's YAML metadata (`huggingface_hub.ModelCardData`) carries the licence (apache-2.0), tags (the
project, mixture-of-experts, multimodal and the routing), the data sources actually used (from the results
file), `base_model` for adapters and folded exports, and a `model-index` built only from numbers read from
the results file. Without results there is no `model-index` and the card says so. Folded exports never get
a `model-index`: their numbers would be the base model's, measured before folding.

    from hub_cards.cards import render_card
    card = render_card("outputs/pretrain-tiny/final", repo_id="user/uniperceiver-moe-tiny")
    card.save("README.md")
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .templates import TEMPLATES

KINDS = ("model", "adapter", "folded")
LICENSE = "apache-2.0"
MODEL_TYPE = "uniperceiver_moe"
ADAPTER_PEFT_TYPE = "UNIPERCEIVER_DEEP_PROMPT"  # prompt_tuning.adapter.PEFT_TYPE (not imported: it pulls in PEFT)
PROJECT_TAG = "uniperceiver-moe"
CODE_URL = "https://github.com/fundamentalvision/Uni-Perceiver"  # the reference implementation

# Task family -> (model-index task type, readable task). Hub task ids where one fits; retrieval has none.
FAMILY_TASKS = {
    "image_classification": ("image-classification", "Image classification (class names as text targets)"),
    "video_classification": ("video-classification", "Video classification (class names as text targets)"),
    "text_classification": ("text-classification", "Text classification (label words as targets)"),
    "mlm": ("fill-mask", "Masked language modelling (vocabulary words as targets)"),
    "captioning": ("image-to-text", "Image captioning"),
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
}
# (family, metric key) or metric key -> readable metric name for the card.
METRIC_NAMES = {
    ("mlm", "token_accuracy"): "masked-token accuracy",
    ("captioning", "token_accuracy"): "next-word accuracy (teacher forcing)",
    "accuracy": "accuracy",
    "bleu4": "BLEU-4",
    "cider": "CIDEr-D",
}
ROUTING_MEANINGS = {
    "none": "dense model: no experts",
    "token": "each token's own hidden state (data-dependent; capacity, load-balancing and z-loss apply)",
    "context": "the mean hidden state of the token's sequence (data-dependent; capacity and aux losses apply)",
    "modality": "the token's modality id (0 text, 1 image, 2 video); data-independent",
    "task": "the task id given with the inputs (`task_ids`); data-independent",
    "attribute": "a binary attribute vector per token (`attribute_vectors`, built by the task registry); "
                 "data-independent",
}
ATTRIBUTE_BITS = ("input_vision", "input_text", "target_vision", "target_text", "token_vision", "token_text",
                  "target_side", "causal_text")  # TokenAttributes field order (modeling_uniperceiver_moe.routing)


class CheckpointError(ValueError):
    """A folder, config or results file that cannot be turned into a card (the message names the problem)."""


# ============================================================================================ reading
def read_json(path: str | os.PathLike, what: str) -> dict:
    """Parse a JSON object file; a missing, unreadable or corrupt file raises a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{what} {path} is not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno} "
                              f"column {error.colno}; the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def detect_kind(folder: str | os.PathLike) -> str:
    """`adapter` (adapter_config.json), `folded` (config.json with folded_routes) or `model` (config.json)."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder")
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json", "model config")
        return "folded" if config.get("folded_routes") else "model"
    raise CheckpointError(
        f"{folder} is not a checkpoint folder: it has neither config.json (a model saved with save_pretrained) "
        f"nor adapter_config.json (a PEFT adapter); files: {sorted(p.name for p in folder.iterdir())[:20]}"
    )


def parse_model_config(config: dict, path: Path):
    """config.json -> `UniPerceiverMoEConfig`; another model type or invalid values raise a CheckpointError."""
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{path} has model_type={config.get('model_type')!r}; these cards are for "
                              f"{MODEL_TYPE!r} checkpoints")
    from modeling_uniperceiver_moe.configuration_uniperceiver_moe import UniPerceiverMoEConfig

    try:
        return UniPerceiverMoEConfig.from_dict(dict(config))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a valid UniPerceiverMoEConfig: {error}") from None


def safetensors_parameter_count(path: Path) -> int | None:
    """Number of elements stored in a .safetensors file, read from its header (no tensor is loaded)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError):
        return None
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")


def weight_files(folder: Path, kind: str) -> list[Path]:
    name = "adapter_model" if kind == "adapter" else "model"
    return sorted(folder.glob(f"{name}*.safetensors")) or sorted(folder.glob(f"{name}*.bin"))


@dataclass
class Checkpoint:
    """What a checkpoint folder holds: its kind, configs and files.

    config: the parsed `UniPerceiverMoEConfig` of the model (for an adapter: of its base model, when the base
    is a local folder; else None). adapter_config: the PEFT config dict (adapters only).
    """

    folder: Path
    kind: str
    config: object | None
    adapter_config: dict | None
    files: list[str]
    parameters: int | None

    @property
    def has_processor(self) -> bool:
        return "processor_config.json" in self.files or "tokenizer.json" in self.files


def inspect_checkpoint(folder: str | os.PathLike, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint folder; `kind` (if given) must agree with what the folder holds."""
    folder = Path(folder)
    detected = detect_kind(folder)
    if kind is not None:
        if kind not in KINDS:
            raise CheckpointError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind != detected and {kind, detected} != {"model", "folded"}:
            raise CheckpointError(f"{folder} holds a {detected} checkpoint, not the {kind} that was asked for")
        if kind == "folded" and detected == "model":
            raise CheckpointError(f"{folder} is not a folded export: its config.json has no folded_routes")
        if kind == "model" and detected == "folded":
            raise CheckpointError(f"{folder} is a folded export (config.json lists folded_routes); use --kind folded")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    weights = weight_files(folder, detected)
    if not weights:
        expected = "adapter_model.safetensors" if detected == "adapter" else "model.safetensors"
        raise CheckpointError(f"{folder} has no weights ({expected} or .bin); is the checkpoint complete?")
    counts = [safetensors_parameter_count(p) for p in weights if p.suffix == ".safetensors"]
    parameters = sum(counts) if counts and None not in counts else None
    if detected == "adapter":
        adapter_config = read_json(folder / "adapter_config.json", "adapter config")
        if adapter_config.get("peft_type") != ADAPTER_PEFT_TYPE:
            raise CheckpointError(f"{folder}/adapter_config.json has peft_type={adapter_config.get('peft_type')!r}; "
                                  f"the adapter card is for prompt-tuning adapters ({ADAPTER_PEFT_TYPE})")
        base = adapter_config.get("base_model_name_or_path")
        config = None
        if base and (Path(base) / "config.json").is_file():
            config = parse_model_config(read_json(Path(base) / "config.json", "base model config"),
                                        Path(base) / "config.json")
        return Checkpoint(folder, detected, config, adapter_config, files, parameters)
    config = parse_model_config(read_json(folder / "config.json", "model config"), folder / "config.json")
    return Checkpoint(folder, detected, config, None, files, parameters)


# ============================================================================================ results
@dataclass(frozen=True)
class Measurement:
    """One measured number: `value` of `metric` for `task` on the test split of data source `source`."""

    task: str
    family: str | None
    metric: str
    value: float
    source: str | None
    chance: float | None = None
    evaluated: int | None = None
    trivial_baseline: float | None = None  # what always giving the most frequent training answer scores


@dataclass
class Results:
    """Measured results read from a results file.

    origin: "pretraining" (report.json) or "prompt_tuning" (results.json). measurements: the numbers the
    card's model-index reports (pre-training: each task's headline metric; prompt tuning: after tuning).
    baseline: prompt tuning's zero-shot numbers (before tuning). info: the run facts the card quotes.
    """

    origin: str
    path: Path
    measurements: list[Measurement]
    baseline: list[Measurement] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return sorted({m.source for m in self.measurements if m.source})


def task_registry() -> dict:
    """Task name -> (family, data source) from the training task registry (empty if it cannot be imported)."""
    try:
        from training.tasks import TASKS
    except ImportError:
        return {}
    return {name: (task.family, task.source) for name, task in TASKS.items()}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_pretraining_report(data: dict, path: Path) -> Results:
    """report.json of `training.pretrain` (keys steps, routing, data_slice, tasks=[{task, family, metric, value, ...}])."""
    rows = data.get("tasks")
    if not isinstance(rows, list) or not rows:
        raise CheckpointError(f"{path} is not a pre-training report: it has no 'tasks' list of results")
    registry = task_registry()
    measurements = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(k in row for k in ("task", "metric", "value")):
            raise CheckpointError(f"{path}: tasks[{i}] must have 'task', 'metric' and 'value'")
        if not is_number(row["value"]):
            raise CheckpointError(f"{path}: tasks[{i}] ({row['task']}) has a non-numeric value {row['value']!r}")
        family, source = registry.get(row["task"], (row.get("family"), None))
        measurements.append(Measurement(
            task=row["task"], family=row.get("family", family), metric=row["metric"], value=row["value"],
            source=source, chance=row.get("chance") if is_number(row.get("chance")) else None,
            evaluated=row.get("evaluated"),
            trivial_baseline=row.get("trivial_baseline") if is_number(row.get("trivial_baseline")) else None,
        ))
    info = {k: data.get(k) for k in ("steps", "processes", "device", "mixed_precision", "routing", "parameters",
                                     "data_slice", "median_tokens_per_second", "skipped_samples")}
    return Results("pretraining", path, measurements, info=info)


def parse_prompt_tuning_results(data: dict, path: Path) -> Results:
    """results.json of `prompt_tuning.run_prompt_tuning` (keys task, method, train_samples, before, after)."""
    if not isinstance(data.get("after"), dict) or not data.get("task"):
        raise CheckpointError(f"{path} is not a prompt-tuning results file: it needs 'task' and an 'after' dict")
    if data.get("method", "prompt") != "prompt":
        raise CheckpointError(f"{path} describes a {data.get('method')!r} run, not a prompt-tuning adapter")
    family, source = task_registry().get(data["task"], (None, None))

    def rows(metrics: dict) -> list[Measurement]:
        return [Measurement(data["task"], family, key, value, source, evaluated=data.get("eval_samples"))
                for key, value in metrics.items() if is_number(value)]

    measurements = rows(data["after"])
    if not measurements:
        raise CheckpointError(f"{path}: 'after' holds no numeric metric")
    info = {k: data.get(k) for k in ("task", "method", "train_samples", "eval_samples", "data_fraction",
                                     "trainable_parameters", "total_parameters")}
    return Results("prompt_tuning", path, measurements, rows(data.get("before") or {}), info)


def load_results(path: str | os.PathLike, kind: str) -> Results:
    """Read a results file for a checkpoint of `kind` (report.json for models, results.json for adapters)."""
    path = Path(path)
    data = read_json(path, "results file")
    if "tasks" in data:
        results = parse_pretraining_report(data, path)
    elif "after" in data:
        results = parse_prompt_tuning_results(data, path)
    else:
        raise CheckpointError(f"{path} is neither a pre-training report.json ('tasks') nor a prompt-tuning "
                              f"results.json ('after')")
    wanted = "prompt_tuning" if kind == "adapter" else "pretraining"
    if results.origin != wanted:
        raise CheckpointError(f"{path} holds {results.origin.replace('_', '-')} results; a {kind} card needs "
                              f"{'a prompt-tuning results.json' if kind == 'adapter' else 'a pre-training report.json'}")
    return results


def check_results_match(ckpt: "Checkpoint", results: Results) -> None:
    """Raise a CheckpointError if a pre-training report visibly describes another model (routing, size)."""
    if results.origin != "pretraining" or ckpt.config is None:
        return
    routing, parameters = results.info.get("routing"), results.info.get("parameters")
    if routing and routing != ckpt.config.moe_routing:
        raise CheckpointError(f"{results.path} reports routing {routing!r}, the checkpoint has "
                              f"{ckpt.config.moe_routing!r}: the report belongs to another model")
    folded = ckpt.kind == "folded"  # a folded export is smaller than the model the report measured
    if not folded and isinstance(parameters, int) and parameters > 0 and ckpt.parameters and parameters != ckpt.parameters:
        raise CheckpointError(f"{results.path} reports {parameters:,} parameters, the checkpoint holds "
                              f"{ckpt.parameters:,}: the report belongs to another model")


def find_results(ckpt: "Checkpoint") -> Results | None:
    """The results file written next to a checkpoint by our scripts, if one is there and matches it.

    Pre-training writes `<run>/final/` and `<run>/report.json`; prompt tuning writes `<run>/adapter/` and
    `<run>/results.json`. Files that exist but are not such results (e.g. the quick-start report.json) or that
    describe another model are skipped. Folded exports are never matched automatically (their numbers would
    be the base model's).
    """
    if ckpt.kind == "folded":
        return None
    name = "results.json" if ckpt.kind == "adapter" else "report.json"
    folder = ckpt.folder.resolve()
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            try:
                results = load_results(candidate, ckpt.kind)
                check_results_match(ckpt, results)
                return results
            except CheckpointError:
                continue
    return None


# ============================================================================================ sections
def metric_name(family: str | None, metric: str) -> str:
    if (family, metric) in METRIC_NAMES:
        return METRIC_NAMES[(family, metric)]
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    for prefix, words in (("i2t_R@", "image-to-text recall@"), ("t2i_R@", "text-to-image recall@")):
        if metric.startswith(prefix):
            return words + metric[len(prefix):]
    return metric.replace("_", " ")


def source_facts(name: str) -> tuple[str, str] | None:
    """(licence, how it is built) of a data source of `training.data_sources`, if known."""
    try:
        from training.data_sources import SOURCES
    except ImportError:
        return None
    source = SOURCES.get(name)
    return (source.licence, source.how) if source else None


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_value(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def attribute_bits(route) -> str:
    return "".join("1" if float(v) else "0" for v in route)


def attribute_meaning(route) -> str:
    names = [name for name, bit in zip(ATTRIBUTE_BITS, route) if float(bit)]
    return ", ".join(names) if names else "(no attribute set)"


def routing_rows(config) -> list[list]:
    """(field, value, meaning) rows describing the routing configuration of a model config."""
    routing = config.moe_routing
    rows = [["`moe_routing`", f"`{routing}`", "the gate sees " + ROUTING_MEANINGS[routing]
             if routing != "none" else ROUTING_MEANINGS["none"]]]
    if routing == "none":
        return rows
    layers = config.moe_layer_indices()
    rows += [
        ["`moe_num_experts`", config.moe_num_experts, "experts per MoE projection"],
        ["`moe_top_k`", config.moe_top_k, "experts combined per token (softmax weights, renormalised when more than one)"],
        ["`moe_layers`", f"`{config.moe_layers}`",
         f"MoE in layers {layers} of {config.num_hidden_layers} (counted from 0)"],
        ["`moe_projections`", ", ".join(config.moe_projections),
         "expert linears; the attention projections share one gate decision, the FFN projections another"],
        ["`moe_router_noise_std`", config.moe_router_noise_std,
         f"Gaussian noise on gate logits in training only (None = 1/E = {1 / config.moe_num_experts:g})"],
    ]
    if routing in ("token", "context"):
        rows += [
            ["`moe_capacity_factor`", config.moe_capacity_factor, "expert capacity in training (tokens over it are dropped)"],
            ["`moe_eval_capacity_factor`", config.moe_eval_capacity_factor, "expert capacity at evaluation (None = unlimited)"],
            ["`moe_aux_loss_coef`", config.moe_aux_loss_coef, "load-balancing loss weight"],
            ["`moe_z_loss_coef`", config.moe_z_loss_coef, "router z-loss weight"],
        ]
    if routing == "attribute":
        rows.append(["`attribute_dim`", config.attribute_dim, "length of the attribute vectors"])
    if routing == "task":
        rows.append(["`num_tasks`", config.num_tasks, "task ids the gate knows"])
    if config.folded_routes is not None:
        rows.append(["`folded_routes`", len(config.folded_routes),
                     "routes merged into this export (listed above); the gates are gone"])
    return rows


def routing_table(config) -> str:
    if config is None:
        return ("The adapter does not change routing; the routing configuration is that of the base model "
                "(see its card; its `config.json` was not available locally when this card was written).")
    return markdown_table(["field", "value", "meaning"], routing_rows(config))


def model_details(ckpt: Checkpoint) -> str:
    config = ckpt.config
    architecture = ", ".join(f"`{a}`" for a in (getattr(config, "architectures", None) or [])) or "(not recorded)"
    rows = [
        ["architecture", architecture],
        ["encoder", f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
                    f"{config.num_attention_heads} heads, FFN {config.intermediate_size} ({config.hidden_act}), pre-norm, "
                    f"LayerScale init {config.layer_scale_init:g}"],
        ["parameters", f"{ckpt.parameters:,}" if ckpt.parameters is not None else "(not counted: no .safetensors)"],
        ["text", f"CLIP byte-level BPE, vocabulary {config.vocab_size} (with [MASK], [GEN], [SPE]), "
                 f"up to {config.max_position_embeddings} positions"],
        ["images / video", f"{config.image_size} px side, {config.patch_size} px patches, "
                           f"{config.num_channels} channels, up to {config.num_frames} frames"],
        ["task families (one temperature each)", ", ".join(config.task_families)],
        ["files", ", ".join(f"`{f}`" for f in ckpt.files if f != "README.md")],
    ]
    return markdown_table(["", ""], rows)


def adapter_details(ckpt: Checkpoint, base_model: str) -> str:
    adapter = ckpt.adapter_config
    learned = [f"deep prompts: {adapter.get('num_prompts')} key and {adapter.get('num_prompts')} value vectors "
               f"per layer, prepended to every sequence's keys and values"]
    if adapter.get("separate_target_prompts"):
        learned.append("a second prompt set used while encoding candidate targets (retrieval)")
    if adapter.get("train_layer_norms"):
        learned.append("trainable copies of the LayerNorms: " + ", ".join(f"`{m}`" for m in adapter.get("modules_to_save") or []))
    if adapter.get("spe_bias"):
        learned.append("a bias on the SPE token embedding")
    if adapter.get("num_labels"):
        learned.append(f"a label prompt for {adapter['num_labels']} classes (zero-initialised linear over the input "
                       f"features, added to the similarity logits with a learnable weight)")
    rows = [
        ["base model", f"`{base_model}`"],
        ["PEFT type", f"`{adapter.get('peft_type')}` (peft {adapter.get('peft_version', '?')})"],
        ["learned", "; ".join(learned)],
        ["adapter parameters", f"{ckpt.parameters:,}" if ckpt.parameters is not None else "(not counted)"],
        ["frozen", "everything else of the base model, experts and gates included"],
        ["files", ", ".join(f"`{f}`" for f in ckpt.files if f != "README.md")],
    ]
    return markdown_table(["", ""], rows)


def folded_details(ckpt: Checkpoint, base_model: str | None) -> str:
    config = ckpt.config
    details = model_details(ckpt)
    details += f"\n\nFolded from: `{base_model}`." if base_model else "\n\nThe MoE model it was folded from is not recorded."
    if config.moe_routing == "attribute":
        rows = [[i, f"`{attribute_bits(r)}`", attribute_meaning(r)] for i, r in enumerate(config.folded_routes)]
        details += "\n\nRoutes this export serves (attribute vectors):\n\n" + markdown_table(
            ["route", "attribute bits", "attributes set"], rows)
    else:
        label = "task id" if config.moe_routing == "task" else "modality id"
        rows = [[i, r] for i, r in enumerate(config.folded_routes)]
        details += f"\n\nRoutes this export serves ({label}s):\n\n" + markdown_table(["route", label], rows)
    return details


def data_sources_table(sources: list[str]) -> str:
    rows = []
    for name in sources:
        facts = source_facts(name)
        rows.append([f"`{name}`", *(facts or ("(unknown)", "(not a source of training/data_sources.py)"))])
    return markdown_table(["data source", "licence", "what it is"], rows)


def pretraining_section(results: Results | None) -> str:
    if results is None:
        return ("No pre-training report (`report.json`) came with this checkpoint, so how it was trained is not "
                "recorded here.")
    info = results.info
    text = (
        f"Multi-task pre-training with `python -m training.pretrain` (the `uniperceiver-moe` package): every task "
        f"is the same similarity-over-candidates objective and each optimizer step trains one task drawn by its "
        f"sampling weight. From the run's report (`{results.path.name}`): {info.get('steps')} optimizer steps on "
        f"{info.get('processes')} process(es) ({info.get('device')}), mixed precision `{info.get('mixed_precision')}`, "
        f"routing `{info.get('routing')}`, data slice `{info.get('data_slice')}`, "
        f"{info.get('skipped_samples')} malformed samples skipped."
    )
    rows = [[m.task, m.family or "", f"`{m.source}`" if m.source else "(unknown)"] for m in results.measurements]
    text += "\n\nTasks:\n\n" + markdown_table(["task", "family", "data source"], rows)
    if results.sources:
        text += ("\n\nThe data are built offline by `training/build_data.py` from files that Debian or PyPI packages "
                 "ship (the names are this project's data sources, not Hub dataset ids):\n\n"
                 + data_sources_table(results.sources))
    return text


def prompt_tuning_section(results: Results | None) -> str:
    recipe = ("Prompt tuning with `python -m prompt_tuning.run_prompt_tuning --method prompt` (the paper's recipe: "
              "the pre-trained model is frozen; AdamW (0.9, 0.95) without weight decay, gradient clipping 0.1, "
              "cosine schedule with warmup).")
    if results is None:
        return recipe + " No `results.json` came with this adapter, so the run's data and numbers are not recorded here."
    info = results.info
    text = recipe + (
        f" From the run's `{results.path.name}`: task `{info.get('task')}`, {info.get('train_samples')} training "
        f"samples ({info.get('data_fraction')} of the training split), {info.get('trainable_parameters')} trainable "
        f"of {info.get('total_parameters')} parameters."
    )
    if results.sources:
        text += "\n\nData source:\n\n" + data_sources_table(results.sources)
    return text


def folded_section(ckpt: Checkpoint) -> str:
    config = ckpt.config
    return (
        f"Made with `modeling_uniperceiver_moe.fold_experts(model, routes)` from a model with `{config.moe_routing}` "
        f"routing. That routing does not look at the data, so every token with the same route key uses the same "
        f"experts with the same weights; for each listed route r every expert projection here holds the merged "
        f"weight W_r = sum_e g_r[e] W_e (gates evaluated without noise) and the matching merged bias. The export "
        f"computes what the MoE model computes for those routes with one dense linear per route; inputs whose route "
        f"key is not listed raise a ValueError. With a single route each expert linear is one dense linear."
    )


def evaluation_section(results: Results | None, kind: str) -> str:
    if results is None:
        return ("No evaluation results came with this checkpoint (no results file was found next to it or given), "
                "so this card has no `model-index` and makes no claim about its quality.")
    if kind == "folded":
        head = ("Measured on the MoE model before folding (from `{}`), not on this export; they are not in this "
                "card's `model-index`.".format(results.path.name))
    elif results.origin == "pretraining":
        head = (f"Held-out test split of each task's data source (up to {max((m.evaluated or 0) for m in results.measurements)} "
                f"samples per task), read from `{results.path.name}`; `chance` is what guessing scores, `trivial "
                f"baseline` what always giving the most frequent training answer scores (majority class, most "
                f"frequent word; chance recall for retrieval). These numbers are in the card's `model-index`.")
    else:
        head = (f"Held-out test split of `{results.info.get('task')}` ({results.info.get('eval_samples')} samples), "
                f"read from `{results.path.name}`: `zero-shot` is the frozen base model without the adapter, "
                f"`prompt-tuned` the base model with this adapter (the latter is in the card's `model-index`).")
    if results.origin == "pretraining":
        rows = [[m.task, m.family or "", metric_name(m.family, m.metric), format_value(m.value),
                 format_value(m.trivial_baseline), format_value(m.chance), m.evaluated if m.evaluated is not None else ""]
                for m in results.measurements]
        return head + "\n\n" + markdown_table(
            ["task", "family", "metric", "value", "trivial baseline", "chance", "evaluated"], rows)
    before = {m.metric: m.value for m in results.baseline}
    rows = [[m.task, metric_name(m.family, m.metric), format_value(before.get(m.metric)), format_value(m.value)]
            for m in results.measurements]
    return head + "\n\n" + markdown_table(["task", "metric", "zero-shot", "prompt-tuned"], rows)


def limitations_section(kind: str, sources: list[str]) -> str:
    points = [
        "A research checkpoint of this project's Uni-Perceiver-MoE implementation. It was trained on small slices "
        "of freely licensed data that ship in Debian/PyPI packages, not on the paper's large pre-training corpora; "
        "its scores are not comparable with the paper's and it is not meant for production use.",
        "Every task is scored as similarity between an encoded input and encoded candidates: the caller supplies "
        "the candidate set (class names, vocabulary words, captions) and, for modality/task/attribute routing, the "
        "route keys (`attribute_vectors` or `task_ids`) that the task registry (`training/tasks.py`) builds.",
        "Text is English only (CLIP BPE). The model has not been evaluated for bias, fairness or safety; do not use "
        "it for decisions about people.",
    ]
    if kind == "folded":
        points.append("This export serves only its folded routes; any other route key raises a ValueError. It "
                      "cannot be trained further as an MoE (the experts and gates are gone).")
    if kind == "adapter":
        points.append("The adapter only works on top of its base model (same weights); with another base the "
                      "prompts are meaningless.")
    if "video_clips" in sources:
        points.append("The `video_clips` labels come from how the clips were cut (source video and playback "
                      "direction), not from human annotation.")
    return "\n".join(f"- {p}" for p in points)


# ============================================================================================ usage
def route_arguments(config, num_targets: str | None) -> list[str]:
    """Keyword arguments (source lines) passing route keys for an image-classification input (and, when
    `num_targets` is given, its class-name targets)."""
    lines = []
    if config.moe_routing == "attribute":
        lines.append('attribute_vectors=TokenAttributes.from_bits("10011000").to_tensor()[None],  # image-classification input')
        if num_targets:
            lines.append(f'target_attribute_vectors=TokenAttributes.from_bits("10010110").to_tensor().expand({num_targets}, -1),  # class-name targets')
    elif config.moe_routing == "task":
        lines.append("task_ids=torch.tensor([0]),  # the task's id in training/tasks.py (0: fashion_mnist_classification)")
        if num_targets:
            lines.append(f"target_task_ids=torch.zeros({num_targets}, dtype=torch.long),")
    return lines  # none / token / context need no route keys; modality ids are derived from the inputs


def has_heads(config) -> bool:
    """Whether the checkpoint holds the similarity heads (saved from UniPerceiverMoEForGenericPerception)."""
    return "UniPerceiverMoEForGenericPerception" in (getattr(config, "architectures", None) or [])


def model_usage(ckpt: Checkpoint, repo_id: str, revision: str | None) -> str:
    config = ckpt.config
    at = f', revision="{revision}"' if revision and revision != "main" else ""
    heads = has_heads(config)
    family = "image_classification" if "image_classification" in config.task_families else config.task_families[0]
    names = (["TokenAttributes"] if config.moe_routing == "attribute" else []) + (
        ["UniPerceiverMoEForGenericPerception"] if heads else []) + ([] if ckpt.has_processor else ["UniPerceiverMoEProcessor"])
    lines = [
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModel" + (", AutoProcessor" if ckpt.has_processor else ""),
        "",
        "import modeling_uniperceiver_moe  # registers the uniperceiver_moe model type",
    ]
    if names:
        lines.append("from modeling_uniperceiver_moe import " + ", ".join(names))
    lines += [
        "",
        f'repo = "{repo_id}"',
        f"encoder = AutoModel.from_pretrained(repo{at}).eval()  # the shared encoder (UniPerceiverMoEModel)",
    ]
    if heads:
        lines.append("# (AutoModel loads the encoder only, so the load report lists the head weights as unexpected)")
    if heads:
        lines.append(f"model = UniPerceiverMoEForGenericPerception.from_pretrained(repo{at}).eval()  # encoder + similarity heads")
    lines.append(f"processor = AutoProcessor.from_pretrained(repo{at})" if ckpt.has_processor else
                 f"processor = UniPerceiverMoEProcessor.build(image_size={config.image_size})  # offline CLIP BPE")
    lines += ["", f'image = Image.new("RGB", ({config.image_size}, {config.image_size}), "white")  # your image here',
              "inputs = processor(images=[image])"]
    if heads:
        call = ['pixel_values=inputs["pixel_values"],', 'target_input_ids=targets["input_ids"],',
                'target_attention_mask=targets["attention_mask"],', f'task_family="{family}",'] + route_arguments(
                    config, "len(class_names)")
        lines += [
            "# zero-shot classification: score the image against class names encoded as text",
            'class_names = ["t-shirt or top", "trouser", "bag"]',
            "targets = processor(text=class_names)",
            "with torch.no_grad():",
            "    out = model(",
            *[f"        {line}" for line in call],
            "    )",
            "print(out.logits.softmax(-1))  # [1, len(class_names)]",
        ]
    else:
        call = ['pixel_values=inputs["pixel_values"],'] + route_arguments(config, None)
        lines += [
            "with torch.no_grad():",
            "    out = encoder(",
            *[f"        {line}" for line in call],
            "    )",
            "print(out.pooler_output.shape)  # the SPE token's state, [1, hidden_size]",
        ]
    return "\n".join(lines)


def adapter_usage(repo_id: str, base_model: str, revision: str | None) -> str:
    at = f', revision="{revision}"' if revision and revision != "main" else ""
    return "\n".join([
        "from peft import PeftModel",
        "",
        "import modeling_uniperceiver_moe  # registers the uniperceiver_moe model type",
        "import prompt_tuning  # registers the UNIPERCEIVER_DEEP_PROMPT adapter type with PEFT",
        "from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception",
        "",
        f'base = UniPerceiverMoEForGenericPerception.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{at}).eval()',
        "# model(...) takes the base model's inputs (see its card); the prompts, LayerNorm copies, SPE bias and",
        "# label prompt act inside. model.disable_adapter() is a context manager giving the base model back.",
    ])


def folded_usage(ckpt: Checkpoint, repo_id: str, revision: str | None) -> str:
    config = ckpt.config
    at = f', revision="{revision}"' if revision and revision != "main" else ""
    route = config.folded_routes[0]
    side = config.image_size
    pixels = f"pixel_values = torch.zeros(1, {config.num_channels}, {side}, {side})  # your image here"
    if config.moe_routing == "attribute":
        inputs = [pixels, f"route = torch.tensor([{[float(v) for v in route]}])  # route 0: {attribute_bits(route)}",
                  "out = model(pixel_values=pixel_values, attribute_vectors=route)"]
    elif config.moe_routing == "task":
        inputs = [pixels, f"out = model(pixel_values=pixel_values, task_ids=torch.tensor([{route}]))  # route 0: task {route}"]
    elif route == 0:  # modality 0: text
        ids = ([] if config.bos_token_id is None else [config.bos_token_id]) + [320, config.eos_token_id]
        inputs = [f"input_ids = torch.tensor([{ids}])  # CLIP BPE ids",
                  "out = model(input_ids=input_ids)  # text: modality 0, this export's route 0"]
    elif route == 1:
        inputs = [pixels, "out = model(pixel_values=pixel_values)  # image: modality 1, this export's route 0"]
    else:
        inputs = [f"pixel_values = torch.zeros(1, {config.num_frames}, {config.num_channels}, {side}, {side})  # a video",
                  "out = model(pixel_values=pixel_values)  # video: modality 2, this export's route 0"]
    return "\n".join([
        "import torch",
        "from transformers import AutoModel",
        "",
        "import modeling_uniperceiver_moe  # registers the uniperceiver_moe model type",
        "",
        f'model = AutoModel.from_pretrained("{repo_id}"{at}).eval()  # dense: one merged linear per route',
        "with torch.no_grad():",
        *[f"    {line}" for line in inputs],
        "print(out.pooler_output.shape)  # the SPE token's state, [1, hidden_size]",
    ])


# ============================================================================================ the card
def is_hub_id(value: str | None) -> bool:
    """`namespace/name` that is not an existing local path (what `base_model` must be on the Hub)."""
    return bool(value) and value.count("/") == 1 and all(value.split("/")) and not os.path.exists(value)


def resolve_base_model(ckpt: Checkpoint, base_model: str | None) -> str | None:
    """The Hub id of the base model: given explicitly, or recorded in adapter_config.json as a Hub id."""
    if base_model is not None:
        if not is_hub_id(base_model):
            raise CheckpointError(f"base model must be a Hub repo id 'namespace/name', got {base_model!r}")
        return base_model
    recorded = (ckpt.adapter_config or {}).get("base_model_name_or_path")
    if ckpt.kind == "adapter":
        if is_hub_id(recorded):
            return recorded
        raise CheckpointError(
            f"the adapter's base model is not a Hub id (adapter_config.json records {recorded!r}); give the Hub "
            f"repo id of the pre-trained model it was tuned on (--base-model namespace/name)")
    if ckpt.kind == "folded":
        raise CheckpointError("a folded export needs the Hub repo id of the MoE model it was folded from "
                              "(--base-model namespace/name)")
    return None


def card_tags(ckpt: Checkpoint) -> list[str]:
    config = ckpt.config
    tags = [PROJECT_TAG, "multimodal"]
    routing = config.moe_routing if config is not None else None
    if routing not in (None, "none"):
        tags += ["mixture-of-experts", f"{routing}-routing"]
    elif routing == "none":
        tags.append("dense")
    if ckpt.kind == "adapter":
        tags += ["peft", "prompt-tuning"]
    if ckpt.kind == "folded":
        tags += ["folded-experts", "merged-dense"]
    return tags


def eval_results(results: Results, model_name: str, data_slice: str | None) -> list[EvalResult]:
    out = []
    for m in results.measurements:
        task_type, task_words = FAMILY_TASKS.get(m.family, (m.family or "other", m.family or "task"))
        out.append(EvalResult(
            task_type=task_type,
            task_name=f"{task_words}: {m.task}",
            dataset_type=m.source or m.task,
            dataset_name=f"{m.source or m.task} (uniperceiver-moe data source)",
            dataset_config=data_slice,
            dataset_split="test",
            metric_type=m.metric,
            metric_name=metric_name(m.family, m.metric),
            metric_value=m.value,
        ))
    return out


def build_card_data(ckpt: Checkpoint, results: Results | None, repo_id: str, base_model: str | None) -> ModelCardData:
    """The YAML metadata: licence, tags, languages, data sources, base model and model-index (when measured)."""
    model_name = repo_id.split("/")[-1]
    kwargs = {}
    if results is not None and ckpt.kind != "folded":
        kwargs["eval_results"] = eval_results(results, model_name, results.info.get("data_slice"))
        kwargs["model_name"] = model_name
    if ckpt.kind == "adapter":
        kwargs["base_model_relation"] = "adapter"
    return ModelCardData(
        license=LICENSE,
        language=["en"],
        library_name="peft" if ckpt.kind == "adapter" else "transformers",
        tags=card_tags(ckpt),
        datasets=results.sources or None if results is not None else None,
        base_model=base_model,
        **kwargs,
    )


def render_card(folder: str | os.PathLike, repo_id: str, kind: str | None = None, results: str | os.PathLike | None = None,
                base_model: str | None = None, revision: str | None = None) -> ModelCard:
    """The model card of the checkpoint in `folder`, to be published as `repo_id`.

    results: a results file (report.json / results.json); None looks next to the checkpoint (see `find_results`).
    base_model: the Hub id of the base model (adapters: unless adapter_config.json records one; folded: required).
    revision: the branch the card's usage snippet should load from (None or "main": the default branch).
    """
    if not is_hub_id(repo_id):
        raise CheckpointError(f"repo id must be 'namespace/name', got {repo_id!r}")
    ckpt = inspect_checkpoint(folder, kind)
    if results is not None:
        found = load_results(results, ckpt.kind)
        check_results_match(ckpt, found)
    else:
        found = find_results(ckpt)
    base = resolve_base_model(ckpt, base_model)
    sources = found.sources if found is not None else []
    name = repo_id.split("/")[-1]
    if ckpt.kind == "model":
        title = f"{name}: Uni-Perceiver-MoE ({ckpt.config.moe_routing} routing)"
        summary = ("A pre-trained Uni-Perceiver-MoE generalist model: one Transformer encoder shared by images, video "
                   "and text, whose linear projections are conditional mixtures of experts; every task is scored as "
                   "the cosine similarity between the encoded input and encoded candidate targets.")
        sections = dict(details=model_details(ckpt), usage=model_usage(ckpt, repo_id, revision),
                        training=pretraining_section(found))
    elif ckpt.kind == "adapter":
        task = found.info.get("task") if found is not None else None
        title = f"{name}: prompt-tuning adapter for Uni-Perceiver-MoE" + (f" ({task})" if task else "")
        size = f"{ckpt.parameters:,} parameters" if ckpt.parameters is not None else "a small set of parameters"
        summary = (f"A deep-prompt adapter for `{base}` trained with the Uni-Perceiver-MoE prompt-tuning recipe: "
                   f"{size} learned on top of the frozen pre-trained model.")
        sections = dict(details=adapter_details(ckpt, base), usage=adapter_usage(repo_id, base, revision),
                        training=prompt_tuning_section(found))
    else:
        title = f"{name}: folded (merged dense) export of a Uni-Perceiver-MoE model"
        summary = (f"A dense re-parameterisation of `{base}` for {len(ckpt.config.folded_routes)} fixed "
                   f"route(s): the experts of each route are merged into one linear per projection, so inference "
                   f"costs what a dense model costs.")
        sections = dict(details=folded_details(ckpt, base), usage=folded_usage(ckpt, repo_id, revision),
                        training=folded_section(ckpt))
    card_data = build_card_data(ckpt, found, repo_id, base)
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATES[ckpt.kind],
        title=title,
        summary=summary,
        routing_table=routing_table(ckpt.config),
        evaluation=evaluation_section(found, ckpt.kind),
        limitations=limitations_section(ckpt.kind, sources),
        **sections,
    )


def python_snippets(card_text: str) -> list[str]:
    """The ```python blocks of a card (the usage examples), in order."""
    blocks, current = [], None
    for line in card_text.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


__all__ = [
    "CheckpointError",
    "Checkpoint",
    "Measurement",
    "Results",
    "KINDS",
    "detect_kind",
    "inspect_checkpoint",
    "load_results",
    "find_results",
    "render_card",
    "python_snippets",
]
