"""Convert checkpoints of the reference Uni-Perceiver(-MoE) code to this package's layout.

    python -m hub_cards.convert_reference uni-perceiver-moe-base.pth converted/ [--num-attention-heads 12]
        [--top-k 2] [--vision-type-embedding] [--ignore-key PATTERN ...] [--no-processor]

The reference implementation (github.com/fundamentalvision/Uni-Perceiver, `MultiTaskTransformerEncoder`)
saves `{"model": state_dict}` with keys such as
`fused_encoder.layers.{i}.linear1.experts.deepspeed_experts.{e}.weight` (one `nn.Linear` per expert),
`fused_encoder.layers.{i}.self_attn.qkv_proj.gate.wg.weight` and `...gate.tag_transform.{0,1}.*` (the
attribute gate), `token_embed.*`, `video_embed.*` and `loss_prepare.*` (the similarity head). Our model
(`UniPerceiverMoEForGenericPerception`) stores the E experts of a projection as ONE parameter `[E, out, in]`
(bias `[E, out]`) and one gate per block (`attn_gate`, `ffn_gate`).

Mapping rules (R = `fused_encoder.layers.{i}.`, O = `uniperceiver.encoder.layers.{i}.`,
M = `uniperceiver.embeddings.`):

| reference | ours | rule |
|---|---|---|
| `token_embed.embeddings.weight` | `M word_embeddings.weight` | copy |
| `token_embed.embeddings_pos.position_embeddings.weight` | `M position_embeddings.weight` | copy |
| `token_embed.embeddings_token_type.weight` `[2, d]` | `M modality_embeddings.weight[0]` (text) | row 0 (the reference adds row 0 to every text token; row 1 is never read) |
| `video_embed.embeddings_type.weight` `[1, d]` | `M modality_embeddings.weight[1]`, `[2]` (image, video) | row 0 if `vision_type_embedding` (reference `VIDEO_EMBED.ADD_TYPE_EMBED=True`); else the rows are 0 and the key is unused, as in the reference, which then never adds it |
| `token_embed.embeddings_norm.*` | `M layer_norm.*` | copy |
| `video_embed.embeddings_norm.*` | (same LayerNorm) | checked equal to the token one (`MODEL.SHARE_LAYERNORM`, one module under two names) |
| `video_embed.embeddings.{weight,bias}` (Conv2d) | `M patch_embedding.*` | copy |
| `video_embed.embeddings_st_pos.temporal_pos_embed.weight` | `M temporal_embeddings.weight` | copy |
| `video_embed.embeddings_st_pos.spatial_pos_embed.weight` | (none: ours are computed) | checked equal (atol 1e-3) to our fixed 2-D sin-cos table at the `MODEL.POSEMBED_SCALE` read off the table (`vision_position_scale`; 160/224 in the reference's 224 px stage-2 configs), which is what the reference stores with `MODEL.POSEMBEDFIX` (MAE init, frozen); learned positions cannot be placed |
| `R norm1.*`, `R norm2.*`, `R gamma_1`, `R gamma_2` | `O norm1.*`, `O norm2.*`, `O layer_scale1.gamma`, `O layer_scale2.gamma` | copy |
| `R self_attn.qkv_proj.{weight,bias}` or `R self_attn.in_proj_{weight,bias}` | `O attention.qkv.*` | copy (dense layer; both reference layouts stack q, k, v with heads contiguous, as ours) |
| `R self_attn.dense.*` or `R self_attn.out_proj.*` | `O attention.out_proj.*` | copy (dense layer) |
| `R linear1.*`, `R linear2.*` | `O mlp.fc1.*`, `O mlp.fc2.*` | copy (dense layer) |
| `R {self_attn.qkv_proj, self_attn.dense, linear1, linear2}.experts.deepspeed_experts.{e}.{weight,bias}` | `O {attention.qkv, attention.out_proj, mlp.fc1, mlp.fc2}.{weight,bias}[e]` | expert e -> slice e of the stacked parameter |
| `R self_attn.qkv_proj.gate.tag_transform.0.*` / `.1.*` / `.wg.weight` | `O attn_gate.router.embed.*` / `.norm.*` / `.gate.weight` | copy (Linear(8->d), LayerNorm, Linear(d->E, no bias)) |
| `R linear1.gate.*` | `O ffn_gate.router.*` | copy, same rule |
| `R self_attn.dense.gate.*` | (none) | dropped: the reference's output projection reuses the qkv gate's decision; its own gate is never evaluated |
| `R linear2.gate.*` | (none) | dropped: with `MOE.FFN_SHARE_GATE_DECISION=True` (every MoE config of the reference repository) fc2 reuses fc1's decision |
| `loss_prepare.ln_post.*`, `loss_prepare.proj.*` | `input_head.{norm,proj}.*` | the reference has one output projection for inputs and targets: the inferred config shares it (`share_projection_head=True`); a `--config` with two heads gets it copied into `target_head` too |
| `loss_prepare.logit_scale_{img_cls, video_cls, text_mlm, caption, retrieve}` | `logit_scales.log_scale[family]` | image_classification, video_classification, mlm and text_classification (the reference GLUE configs use `logit_scale_text_mlm`), captioning, retrieval |
| other `loss_prepare.logit_scale_*`, `loss_prepare.queue_*` | (none) | dropped: temperatures of task kinds we do not have; memory-bank buffers (training state) |

Everything else is an error: reference keys that no rule places (listed), and our keys (or expert slices)
that stay unfilled (listed, with the reference keys that would have filled them). `ignore=` patterns
(fnmatch) acknowledge reference keys to leave out, e.g. learned spatial positions.

Where the reference layout is ambiguous (the weights alone do not say):

* `VIDEO_EMBED.ADD_TYPE_EMBED`: whether the vision type embedding was added (`vision_type_embedding`). The
  MoE configs leave it off, but the reference's conversion notebook also writes a `...-withvtype.pth` file, so
  check the config a checkpoint was trained with.
* `MOE.FFN_SHARE_GATE_DECISION`: assumed True (every MoE config of the reference repository); with False fc2
  has its own gate, which our model cannot represent, and the conversion would silently change the model.
* `MOE.MOE_EXPERT_LOCATION='odd'` means 0-based layers 0, 2, 4, ... (`layer_idx % 2 == 0`); this package's
  `moe_layers="every_other"` means 1, 3, 5, ..., so `infer_config` writes the MoE layers as an explicit list
  read from the keys.
* The number of attention heads and the top-k are not stored: `infer_config` takes the paper's heads for the
  width (192: 3, 384: 6, 768: 12, 1024: 16) and top-2 (every MoE config of the reference repository), unless
  given.
* Outputs: a tiny model built and run by the official code (random weights, attribute MoE in layers 0 and 2)
  converts into ours with the same encoder states, features and logits to 2e-6 for image classification,
  captioning with placeholders and masked-language modelling (`tests/test_reference_fidelity.py`, fixture made
  by `benchmarks/official_fixture/make_fixture.py`). No released checkpoint was converted here: they are not
  reachable from this machine.
* A raw DeepSpeed file (`mp_rank_00_model_states.pt`: `{"module": ...}` with `encoder.*` / `deepspeed_moe.*`
  names, as the released MoE checkpoints come) is first renamed to the layout above, as the reference's
  `tools/convertmoe.ipynb` does (`DEEPSPEED_RENAMES`; `residual_scale` `[1, 1, d]` -> `gamma_{1,2}` `[d]`;
  `visual_embed.*`, unused by the MoE models, dropped). The experts must be in that file, as in the
  reference's checkpoints; experts saved to separate per-expert files are reported as missing keys.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

# Raw DeepSpeed names -> the reference's own layout, applied in order to every key (substring renames).
DEEPSPEED_RENAMES = (
    ("encoder.", "fused_encoder."),
    ("attention.self.qkv_proj", "self_attn.qkv_proj"),
    ("deepspeed_moe.gate", "gate"),
    ("deepspeed_moe.experts", "experts"),
    ("attention.output.dense", "self_attn.dense"),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn.dense.", "linear1."),
    ("ffn.dense2.", "linear2."),
    ("ffn_output.residual_scale", "gamma_2"),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
    ("predictor.", "loss_prepare."),
)
LAYER_PREFIX = "fused_encoder.layers.{i}."
OUR_LAYER_PREFIX = "uniperceiver.encoder.layers.{i}."
OUR_EMBEDDINGS = "uniperceiver.embeddings."
EXPERTS = "experts.deepspeed_experts.{e}."

# our projection -> (reference module, alternative dense (weight, bias) key pairs)
PROJECTIONS = {
    "attn_qkv": ("attention.qkv", "self_attn.qkv_proj",
                 (("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias"), ("self_attn.in_proj_weight", "self_attn.in_proj_bias"))),
    "attn_out": ("attention.out_proj", "self_attn.dense",
                 (("self_attn.dense.weight", "self_attn.dense.bias"), ("self_attn.out_proj.weight", "self_attn.out_proj.bias"))),
    "ffn_fc1": ("mlp.fc1", "linear1", (("linear1.weight", "linear1.bias"),)),
    "ffn_fc2": ("mlp.fc2", "linear2", (("linear2.weight", "linear2.bias"),)),
}
# our gate -> reference module whose gate decides for the block
GATES = {"attn_gate": "self_attn.qkv_proj.gate.", "ffn_gate": "linear1.gate."}
GATE_PARTS = {  # our router parameter -> reference gate parameter
    "embed.weight": "tag_transform.0.weight",
    "embed.bias": "tag_transform.0.bias",
    "norm.weight": "tag_transform.1.weight",
    "norm.bias": "tag_transform.1.bias",
    "gate.weight": "wg.weight",
}
# our task family -> the reference temperature it takes
LOGIT_SCALES = {
    "image_classification": "loss_prepare.logit_scale_img_cls",
    "video_classification": "loss_prepare.logit_scale_video_cls",
    "mlm": "loss_prepare.logit_scale_text_mlm",
    "text_classification": "loss_prepare.logit_scale_text_mlm",
    "captioning": "loss_prepare.logit_scale_caption",
    "retrieval": "loss_prepare.logit_scale_retrieve",
}
# reference keys we know and deliberately leave out, with the reason
DROPPED = (
    ("fused_encoder.layers.*.self_attn.dense.gate.*",
     "the attention output projection reuses the qkv projection's gate decision; its own gate is never evaluated"),
    ("fused_encoder.layers.*.linear2.gate.*",
     "fc2 reuses fc1's gate decision (MOE.FFN_SHARE_GATE_DECISION=True)"),
    ("loss_prepare.logit_scale_text_caption", "temperature of a task kind we do not have"),
    ("loss_prepare.logit_scale_mlm", "temperature of a task kind we do not have (pre-training MLM uses text_mlm)"),
    ("loss_prepare.logit_scale_tqa_*", "temperature of a task kind we do not have (text QA)"),
    ("loss_prepare.logit_scale_downstream", "temperature of a task kind we do not have"),
    ("loss_prepare.queue_*", "memory-bank buffers of the contrastive queue (training state)"),
)
SPATIAL_POSITIONS = "video_embed.embeddings_st_pos.spatial_pos_embed.weight"
PRESET_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16}  # the paper's sizes: width -> heads


class ConversionError(ValueError):
    """The reference checkpoint does not map onto the config (the message lists the keys involved)."""


@dataclass(frozen=True)
class Placement:
    """One reference tensor placed into our state dict.

    target: our key. source: the reference key. index: when set, the tensor fills `target[index]` (expert e,
    a modality row, a task family's temperature). source_row: when set, only that row of the source is used.
    """

    target: str
    source: str
    index: int | None = None
    source_row: int | None = None


@dataclass(frozen=True)
class Check:
    """A reference tensor that has no place of its own but must equal something we hold (`expected`)."""

    source: str
    what: str
    expected: object  # a reference key (str) or a function config -> tensor
    atol: float = 0.0


@dataclass
class Plan:
    placements: list[Placement]
    checks: list[Check]
    zero_rows: list[tuple[str, int]]  # (our key, row) set to zero on purpose


# ============================================================================================ the plan
def first_present(candidates, available: set[str]):
    """The first candidate whose keys are all available, else the first one (reported as missing)."""
    for candidate in candidates:
        if all(key in available for key in candidate):
            return candidate
    return candidates[0]


def spatial_sincos(config, rows: int) -> torch.Tensor:
    """Our fixed 2-D sin-cos positions for a square grid of `rows` patches at `config.vision_position_scale`
    (what the reference stores frozen, at its `POSEMBED_SCALE`)."""
    from modeling_uniperceiver_moe.modeling_uniperceiver_moe import sincos_2d_position_embedding

    side = math.isqrt(rows)
    if side * side != rows:
        raise ConversionError(f"{SPATIAL_POSITIONS} has {rows} rows, not a square grid")
    return sincos_2d_position_embedding(side, side, config.hidden_size, scale=config.vision_position_scale)


def position_scale_of(table: torch.Tensor) -> float:
    """The reference's `POSEMBED_SCALE` read off its stored sin-cos table `[side * side, d]`: the entry of the
    grid point one row down, at the fastest frequency (1), is sin(scale)."""
    side = math.isqrt(table.shape[0])
    value = float(table[side, 0].clamp(-1.0, 1.0)) if side > 1 else 0.0
    scale = math.asin(value)
    return round(scale, 6) if scale > 0 else 1.0


def layer_plan(config, i: int, available: set[str]) -> list[Placement]:
    ref, ours = LAYER_PREFIX.format(i=i), OUR_LAYER_PREFIX.format(i=i)
    out = [Placement(ours + f"norm{n}.{p}", ref + f"norm{n}.{p}") for n in (1, 2) for p in ("weight", "bias")]
    if config.layer_scale_init > 0:
        out += [Placement(ours + "layer_scale1.gamma", ref + "gamma_1"), Placement(ours + "layer_scale2.gamma", ref + "gamma_2")]
    for projection, (our_name, module, dense_keys) in PROJECTIONS.items():
        if config.uses_moe(i, projection):
            for e in range(config.moe_num_experts):
                expert = ref + module + "." + EXPERTS.format(e=e)
                out += [Placement(f"{ours}{our_name}.{p}", expert + p, index=e) for p in ("weight", "bias")]
        else:
            weight, bias = first_present([tuple(ref + k for k in pair) for pair in dense_keys], available)
            out += [Placement(f"{ours}{our_name}.weight", weight), Placement(f"{ours}{our_name}.bias", bias)]
    moe_here = i in config.moe_layer_indices()
    blocks = {"attn_gate": ("attn_qkv", "attn_out"), "ffn_gate": ("ffn_fc1", "ffn_fc2")}
    for gate, projections in blocks.items():
        if moe_here and any(p in config.moe_projections for p in projections):
            out += [Placement(f"{ours}{gate}.router.{mine}", ref + GATES[gate] + theirs) for mine, theirs in GATE_PARTS.items()]
    return out


def build_plan(config, reference_keys, vision_type_embedding: bool = False, with_heads: bool = True) -> Plan:
    """Every placement, check and deliberate zero that maps a reference state dict onto `config`'s model."""
    if config.folded_routes is not None:
        raise ConversionError("convert into an unfolded config (folded_routes=None); fold afterwards with fold_experts")
    if config.moe_routing not in ("none", "attribute"):
        raise ConversionError(f"the reference implements attribute routing only; the config asks for "
                              f"moe_routing={config.moe_routing!r}, whose routers no reference tensor can fill")
    available = set(reference_keys)
    m = OUR_EMBEDDINGS
    placements = [
        Placement(m + "word_embeddings.weight", "token_embed.embeddings.weight"),
        Placement(m + "position_embeddings.weight", "token_embed.embeddings_pos.position_embeddings.weight"),
        Placement(m + "modality_embeddings.weight", "token_embed.embeddings_token_type.weight", index=0, source_row=0),
        Placement(m + "layer_norm.weight", "token_embed.embeddings_norm.weight"),
        Placement(m + "layer_norm.bias", "token_embed.embeddings_norm.bias"),
        Placement(m + "patch_embedding.weight", "video_embed.embeddings.weight"),
        Placement(m + "patch_embedding.bias", "video_embed.embeddings.bias"),
        Placement(m + "temporal_embeddings.weight", "video_embed.embeddings_st_pos.temporal_pos_embed.weight"),
    ]
    checks = [
        Check("video_embed.embeddings_norm.weight", "the shared embedding LayerNorm", "token_embed.embeddings_norm.weight"),
        Check("video_embed.embeddings_norm.bias", "the shared embedding LayerNorm", "token_embed.embeddings_norm.bias"),
        Check(SPATIAL_POSITIONS, "fixed 2-D sin-cos spatial positions", spatial_sincos, atol=1e-3),
    ]
    zero_rows = []
    for row in (1, 2):  # image, video
        if vision_type_embedding:
            placements.append(Placement(m + "modality_embeddings.weight", "video_embed.embeddings_type.weight",
                                        index=row, source_row=0))
        else:
            zero_rows.append((m + "modality_embeddings.weight", row))
    if not vision_type_embedding and "video_embed.embeddings_type.weight" in available:
        checks.append(Check("video_embed.embeddings_type.weight", "the vision type embedding (unused without "
                            "VIDEO_EMBED.ADD_TYPE_EMBED)", None))
    for i in range(config.num_hidden_layers):
        placements += layer_plan(config, i, available)
    if with_heads:
        for head in ("input_head",) if config.share_projection_head else ("input_head", "target_head"):
            placements += [Placement(f"{head}.{mine}.{p}", f"loss_prepare.{theirs}.{p}")
                           for mine, theirs in (("norm", "ln_post"), ("proj", "proj")) for p in ("weight", "bias")]
        for f, family in enumerate(config.task_families):
            if family not in LOGIT_SCALES:
                raise ConversionError(f"task family {family!r} has no reference temperature; known: {sorted(LOGIT_SCALES)}")
            placements.append(Placement("logit_scales.log_scale", LOGIT_SCALES[family], index=f))
    return Plan(placements, checks, zero_rows)


# ============================================================================================ conversion
def our_layout(config, with_heads: bool = True) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our state dict's keys, shapes and dtypes, read from a model built on the meta device (no memory)."""
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception, UniPerceiverMoEModel

    cls = UniPerceiverMoEForGenericPerception if with_heads else UniPerceiverMoEModel
    with torch.device("meta"):
        model = cls(config)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def listing(keys, limit: int = 40) -> str:
    keys = sorted(keys)
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {shown}{more}"


def dropped_reason(key: str) -> str | None:
    for pattern, reason in DROPPED:
        if fnmatch.fnmatchcase(key, pattern):
            return reason
    return None


def convert_state_dict(reference_sd: dict[str, torch.Tensor], config, *, vision_type_embedding: bool = False,
                       ignore: tuple[str, ...] | list[str] = (), with_heads: bool = True,
                       report: dict | None = None) -> dict[str, torch.Tensor]:
    """Map a reference state dict onto our layout for `config` (see the module docstring for every rule).

    vision_type_embedding: the reference ran with `VIDEO_EMBED.ADD_TYPE_EMBED=True` (copy its vision type
        embedding to our image and video rows); False leaves those rows at zero, as the reference then adds none.
    ignore: fnmatch patterns of reference keys to leave out on purpose.
    with_heads: produce `UniPerceiverMoEForGenericPerception` keys (else `UniPerceiverMoEModel` keys).
    report: if given, filled with what was placed, checked, dropped and ignored.
    Raises ConversionError listing unplaced reference keys, missing reference keys / unfilled keys of ours,
    shape mismatches and failed checks.
    """
    layout = our_layout(config, with_heads)
    prefix = "" if with_heads else "uniperceiver."
    plan = build_plan(config, reference_sd.keys(), vision_type_embedding, with_heads)
    if not with_heads:
        plan.placements = [Placement(p.target[len(prefix):], p.source, p.index, p.source_row) for p in plan.placements]
        plan.zero_rows = [(t[len(prefix):], r) for t, r in plan.zero_rows]

    # 1. every reference key is placed, checked, dropped by a rule or ignored on purpose (an ignored key that
    #    would be checked is not checked)
    def is_ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)

    ignored_checks = {c.source for c in plan.checks if c.source in reference_sd and is_ignored(c.source)}
    plan.checks = [c for c in plan.checks if c.source not in ignored_checks]
    used = {p.source for p in plan.placements} | {c.source for c in plan.checks}
    leftover = set(reference_sd) - used
    dropped = {k: dropped_reason(k) for k in leftover if dropped_reason(k)}
    ignored = {k for k in leftover - set(dropped) if is_ignored(k)}
    unexpected = leftover - set(dropped) - ignored
    missing = defaultdict(list)
    for p in plan.placements:
        if p.source not in reference_sd:
            missing[p.source].append(p.target + (f"[{p.index}]" if p.index is not None else ""))
    skipped_checks = [c for c in plan.checks if c.source not in reference_sd]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} reference key(s) have no place in our layout "
                        f"(pass ignore=/--ignore-key to leave them out on purpose):" + listing(unexpected))
    if missing:
        problems.append(f"{len(missing)} reference key(s) needed by the config are missing, so these keys of ours "
                        f"stay unfilled:" + listing(f"{src} -> {', '.join(dst)}" for src, dst in missing.items()))
    unknown_targets = {p.target for p in plan.placements} - set(layout)
    if unknown_targets:  # a rule aimed at a key our model does not have (config and plan disagree)
        problems.append("the plan targets keys our model does not have:" + listing(unknown_targets))
    if problems:
        raise ConversionError("cannot convert the reference checkpoint:\n" + "\n".join(problems))

    # 2. place the tensors
    out: dict[str, torch.Tensor] = {}
    filled = defaultdict(set)
    errors = []
    by_target = defaultdict(list)
    for p in plan.placements:
        by_target[p.target].append(p)
    for target, placements in by_target.items():
        shape, dtype = layout[target]
        for p in placements:
            tensor = reference_sd[p.source]
            if p.source_row is not None:
                if tensor.dim() == 0 or tensor.shape[0] <= p.source_row:
                    errors.append(f"{p.source}: shape {tuple(tensor.shape)} has no row {p.source_row}")
                    continue
                tensor = tensor[p.source_row]
            want = shape if p.index is None else shape[1:]
            if tuple(tensor.shape) != tuple(want):
                errors.append(f"{p.source} {tuple(tensor.shape)} -> {target}"
                              f"{'' if p.index is None else f'[{p.index}]'} {tuple(want)}")
                continue
            tensor = tensor.detach().to(dtype=dtype, device="cpu")
            if p.index is None:
                out[target] = tensor.clone()
                filled[target].add(None)
            else:
                if target not in out:
                    out[target] = torch.zeros(shape, dtype=dtype)
                out[target][p.index] = tensor
                filled[target].add(p.index)
    for target, row in plan.zero_rows:
        shape, dtype = layout[target]
        out.setdefault(target, torch.zeros(shape, dtype=dtype))[row] = 0
        filled[target].add(row)
    if errors:
        raise ConversionError("shape mismatch (reference key, shape -> our key, shape):" + listing(errors))

    # 3. every key of ours, and every row of a stacked key, is filled
    unfilled = []
    for key, (shape, _) in layout.items():
        rows = filled.get(key)
        if not rows:
            unfilled.append(key)
        elif None not in rows:
            unfilled += [f"{key}[{r}]" for r in range(shape[0]) if r not in rows]
    if unfilled:
        raise ConversionError("these keys of ours are left unfilled by the reference checkpoint:" + listing(unfilled))

    # 4. tensors that have no place of their own must agree with what we hold
    failed = []
    for check in plan.checks:
        if check.source not in reference_sd or check.expected is None:
            continue
        actual = reference_sd[check.source].detach().float().cpu()
        if callable(check.expected):
            expected = check.expected(config, actual.shape[0]) if check.source == SPATIAL_POSITIONS else check.expected(config)
        else:
            expected = reference_sd[check.expected].detach().float().cpu()
        if actual.shape != expected.shape:
            failed.append(f"{check.source} ({check.what}): shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        elif not torch.allclose(actual, expected, atol=check.atol, rtol=0):
            failed.append(f"{check.source} ({check.what}): differs by up to {float((actual - expected).abs().max()):.3g} "
                          f"(tolerance {check.atol:g})")
    if failed:
        raise ConversionError(
            "reference tensors that our model does not store differ from what it computes; ignore them on purpose "
            "(ignore=/--ignore-key) only if you accept a different model:" + listing(failed))
    if report is not None:
        report.update(placed=len(plan.placements), checked=sorted(c.source for c in plan.checks if c.source in reference_sd),
                      skipped_checks=sorted(c.source for c in skipped_checks), dropped=dict(sorted(dropped.items())),
                      ignored=sorted(ignored))
    return out


# ============================================================================================ config
def layer_modules(reference_keys) -> dict[int, dict[str, set[int]]]:
    """layer -> reference projection module -> expert indices found (empty set: dense)."""
    pattern = re.compile(r"^fused_encoder\.layers\.(\d+)\.(self_attn\.qkv_proj|self_attn\.dense|self_attn\.in_proj|"
                         r"self_attn\.out_proj|linear1|linear2)(?:\.experts\.deepspeed_experts\.(\d+))?[._]")
    layers: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for key in reference_keys:
        match = pattern.match(key)
        if match:
            module = layers[int(match.group(1))][match.group(2)]
            if match.group(3) is not None:
                module.add(int(match.group(3)))
    return layers


def infer_config(reference_sd: dict[str, torch.Tensor], **overrides):
    """A `UniPerceiverMoEConfig` read off the reference tensors' names and shapes; `overrides` win.

    Read: width, depth, FFN width, vocabulary, text positions, frames, patch size, channels, image size and
    position scale (from the spatial position table), experts, MoE layers (an explicit list) and projections, attribute length,
    LayerScale presence. The reference's one output head: `share_projection_head=True`.
    Not stored, so defaulted: attention heads (the paper's for the width), top-k (2),
    LayerNorm eps (1e-5, torch's default that the reference uses).
    """
    from modeling_uniperceiver_moe import REFERENCE_INIT, UniPerceiverMoEConfig

    def shape(key):
        if key not in reference_sd:
            raise ConversionError(f"cannot infer the config: the reference checkpoint has no {key}")
        return tuple(reference_sd[key].shape)

    vocab, hidden = shape("token_embed.embeddings.weight")
    layers = layer_modules(reference_sd)
    if not layers:
        raise ConversionError("cannot infer the config: no fused_encoder.layers.{i}.* keys")
    depth = max(layers) + 1
    modules = {"self_attn.qkv_proj": "attn_qkv", "self_attn.dense": "attn_out", "linear1": "ffn_fc1", "linear2": "ffn_fc2"}
    moe_layers = sorted(i for i, mods in layers.items() if any(mods.values()))
    projections = {tuple(sorted(modules[m] for m, experts in layers[i].items() if experts and m in modules)) for i in moe_layers}
    if len(projections) > 1:
        raise ConversionError(f"the reference puts experts in different projections per layer ({sorted(projections)}); "
                              f"our config has one moe_projections list")
    counts = {len(e) for i in moe_layers for e in layers[i].values() if e}
    if len(counts) > 1:
        raise ConversionError(f"the reference layers have different expert counts {sorted(counts)}")
    fc1 = next((k for k in reference_sd if re.match(r"^fused_encoder\.layers\.\d+\.linear1\.(experts\.deepspeed_experts\.\d+\.)?weight$", k)), None)
    if fc1 is None:
        raise ConversionError("cannot infer the config: no linear1 weight")
    conv = shape("video_embed.embeddings.weight")
    if len(conv) != 4:
        raise ConversionError(f"video_embed.embeddings.weight has shape {conv}: only the Conv2d patch embedding "
                              f"(VIDEO_EMBED.DIVIDE_ST_POS=True) maps onto ours")
    values = dict(
        model_size=None, hidden_size=hidden, num_hidden_layers=depth, vocab_size=vocab,
        intermediate_size=tuple(reference_sd[fc1].shape)[0],
        max_position_embeddings=shape("token_embed.embeddings_pos.position_embeddings.weight")[0],
        num_frames=shape("video_embed.embeddings_st_pos.temporal_pos_embed.weight")[0],
        patch_size=conv[-1], num_channels=conv[1],
        **REFERENCE_INIT,  # the reference's initialisation (only what the checkpoint lacks is drawn with it)
        drop_path_rate=0.0, layer_norm_eps=1e-5,
        share_projection_head=True,  # one ln_post + proj for inputs and candidates
        random_temporal_offset=True,  # VIDEO_EMBED.POS_RANDOM (on by default in the reference)
        text_distance_bias="none",  # the reference's attention has no bias between words
        word_logit_bias=False,  # nor a bias per candidate word
        bos_token_id=None,  # the reference's texts start with their first word (`text + " <|endoftext|>"`)
    )
    if f"{LAYER_PREFIX.format(i=0)}gamma_1" not in reference_sd:
        values["layer_scale_init"] = 0.0
    if SPATIAL_POSITIONS in reference_sd:
        values["image_size"] = math.isqrt(shape(SPATIAL_POSITIONS)[0]) * conv[-1]
        values["vision_position_scale"] = position_scale_of(reference_sd[SPATIAL_POSITIONS].float())
    if moe_layers:
        gate = f"{LAYER_PREFIX.format(i=moe_layers[0])}"
        gate_key = next((k for k in reference_sd if k.startswith(gate) and k.endswith("gate.tag_transform.0.weight")), None)
        if gate_key is None:
            raise ConversionError(f"layer {moe_layers[0]} has experts but no attribute gate (gate.tag_transform.0.weight)")
        values.update(moe_routing="attribute", moe_num_experts=counts.pop(), moe_top_k=2, moe_layers=moe_layers,
                      moe_projections=list(projections.pop()), attribute_dim=tuple(reference_sd[gate_key].shape)[1])
    else:
        values["moe_routing"] = "none"
    values.update(overrides)
    if values.get("num_attention_heads") is None:
        if hidden not in PRESET_HEADS:
            raise ConversionError(f"the number of attention heads is not stored; width {hidden} is not a paper size "
                                  f"({sorted(PRESET_HEADS)}): give num_attention_heads")
        values["num_attention_heads"] = PRESET_HEADS[hidden]
    return UniPerceiverMoEConfig(**values)


# ============================================================================================ files
def is_deepspeed_layout(state_dict: dict) -> bool:
    return any(k.startswith(("encoder.", "predictor.")) or ".deepspeed_moe." in k for k in state_dict)


def from_deepspeed_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A raw DeepSpeed module state dict renamed to the reference's own layout (`DEEPSPEED_RENAMES`),
    LayerScale `residual_scale` `[1, 1, d]` squeezed to `[d]`, the unused `visual_embed.*` left out."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("visual_embed"):
            continue
        if key.endswith("residual_scale"):
            if value.dim() != 3 or value.shape[:2] != (1, 1):
                raise ConversionError(f"{key} has shape {tuple(value.shape)}; a residual scale is [1, 1, d]")
            value = value[0, 0]
        for old, new in DEEPSPEED_RENAMES:
            if old in key:
                key = key.replace(old, new)
        if key in renamed:
            raise ConversionError(f"two DeepSpeed keys map onto {key}")
        renamed[key] = value
    return renamed


# what the reference's prompt tuning adds to a checkpoint (its LayerNorms, also tuned, keep their usual names)
PROMPT_TUNING_KEYS = ("deep_prompt_embedding.", "s_token_bias", "fc_prompt.", "similarity_weight")


def split_prompt_tuning(reference_sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A reference state dict -> (the model's own tensors, the prompt-tuning tensors)."""
    prompt = {k: v for k, v in reference_sd.items() if any(part in k for part in PROMPT_TUNING_KEYS)}
    return {k: v for k, v in reference_sd.items() if k not in prompt}, prompt


def prompt_keys_and_values(model, prompts: list[torch.Tensor], route) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference's deep prompts `[P, d]` per layer -> our (keys, values) `[P, d]` per layer.

    The reference feeds layer l's prompts only as keys and values: `norm1_l(P_l)` through the key and value rows
    of the layer's qkv projection, with the route of the sequence they join (its first attribute row), and never
    as queries. With the projection frozen, those keys and values are fixed: computed once here, with the
    experts folded for `route` (an attribute vector, or None for a dense model).
    """
    from modeling_uniperceiver_moe.reparameterization import fold_experts

    routed = model.config.moe_routing != "none"
    net = fold_experts(model, torch.as_tensor(route, dtype=torch.float32)[None]) if routed else model
    width, pairs = model.config.hidden_size, []
    with torch.no_grad():
        for layer, prompt in zip(net.uniperceiver.encoder.layers, prompts):
            linear = layer.attention.qkv
            weight = linear.weight[0] if linear.weight.dim() == 3 else linear.weight  # one folded route
            bias = None if linear.bias is None else (linear.bias[0] if linear.bias.dim() == 2 else linear.bias)
            qkv = F.linear(layer.norm1(prompt.to(weight.dtype)), weight, bias)
            pairs.append((qkv[:, width:2 * width].clone(), qkv[:, 2 * width:].clone()))
    return pairs


def convert_prompt_tuned(reference_sd: dict[str, torch.Tensor], config, input_route, target_route):
    """A checkpoint of the reference's prompt tuning -> our model with a deep-prompt adapter (a `PeftModel`) that
    computes the same outputs for the task it was tuned on.

    The tuned LayerNorms go into the model (and so into the adapter's trainable copies); the deep prompts become
    key/value prompts, one set for the inputs (`input_route`) and one for the candidates (`target_route`), as
    the reference routes its shared prompts with each sequence's own attribute row; `s_token_bias` becomes the
    SPE bias; `fc_prompt` and `similarity_weight` the label prompt. Routes: the task's attribute vectors
    (`Task.input_attributes` / `target_attributes`; the caption image row for captioning).
    """
    from peft import get_peft_model

    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from prompt_tuning.adapter import DeepPromptConfig

    base_sd, prompt = split_prompt_tuning(reference_sd)
    layers = [prompt.get(f"{LAYER_PREFIX.format(i=i)}deep_prompt_embedding.embedding.weight")
              for i in range(config.num_hidden_layers)]
    if any(p is None for p in layers):
        raise ConversionError("not a deep-prompt checkpoint: some layers have no deep_prompt_embedding.embedding.weight")
    model = UniPerceiverMoEForGenericPerception(config)
    model.load_state_dict(convert_state_dict(base_sd, config), strict=True)
    model.eval()
    inputs, targets = prompt_keys_and_values(model, layers, input_route), prompt_keys_and_values(model, layers, target_route)
    label = prompt.get("fc_prompt.weight")
    tuned = get_peft_model(model, DeepPromptConfig(
        num_prompts=layers[0].shape[0], separate_target_prompts=True, spe_bias="s_token_bias" in prompt,
        num_labels=None if label is None else label.shape[0])).eval()
    tuner = tuned.base_model
    with torch.no_grad():
        for layer, (keys, values), (target_keys, target_values) in zip(model.uniperceiver.encoder.layers, inputs, targets):
            attention = layer.attention
            attention.deep_prompt_keys["default"].copy_(keys)
            attention.deep_prompt_values["default"].copy_(values)
            attention.deep_prompt_target_keys["default"].copy_(target_keys)
            attention.deep_prompt_target_values["default"].copy_(target_values)
        if "s_token_bias" in prompt:
            tuner.deep_prompt_spe_bias["default"].copy_(prompt["s_token_bias"].reshape(-1))
        if label is not None:
            tuner.deep_prompt_label_weight["default"].copy_(label)
            tuner.deep_prompt_label_bias["default"].copy_(prompt["fc_prompt.bias"])
            tuner.deep_prompt_similarity_weight["default"].copy_(prompt.get("similarity_weight", torch.ones(())).reshape(()))
    return tuned


def load_reference_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .pth / .bin / .safetensors reference checkpoint into a flat {key: tensor} dict."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConversionError(f"reference checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (pickle / zip errors of every kind)
            raise ConversionError(f"cannot read {path} as a torch checkpoint (weights only): {error}") from None
    deepspeed = False
    if isinstance(data, dict) and "module" in data and isinstance(data["module"], dict):
        data, deepspeed = data["module"], is_deepspeed_layout(data["module"])
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{path} holds no state dict")
    not_tensors = sorted(k for k, v in data.items() if not torch.is_tensor(v))
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors:" + listing(not_tensors))
    if all(k.startswith("module.") for k in data):  # DistributedDataParallel prefix
        data = {k[len("module."):]: v for k, v in data.items()}
    return from_deepspeed_layout(data) if deepspeed else data


def convert_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, config=None, processor: bool = True,
                       **kwargs):
    """Convert a reference checkpoint file into a `save_pretrained` folder; returns (model, report)."""
    reference = load_reference_checkpoint(path)
    return save_converted(reference, out_dir, config or infer_config(reference), processor, **kwargs)


def save_converted(reference: dict[str, torch.Tensor], out_dir: str | os.PathLike, config, processor: bool = True,
                   **kwargs):
    """Convert a loaded reference state dict and write model (+ processor) with `save_pretrained`."""
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception, UniPerceiverMoEProcessor

    report: dict = {}
    state = convert_state_dict(reference, config, report=report, **kwargs)
    config.architectures = ["UniPerceiverMoEForGenericPerception"]
    model = UniPerceiverMoEForGenericPerception(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir)
    if processor:
        # the reference's evaluation transform (ImageNet statistics, short side 256/224 of the crop), and texts
        # with or without the start token as the config says (without: the reference's)
        UniPerceiverMoEProcessor.build(image_size=config.image_size, image_preprocessing="reference",
                                       add_bos_token=config.bos_token_id is not None).save_pretrained(out_dir)
    return model, report


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={"positional": True,
                                      "help": "reference checkpoint: .pth / .bin (torch), .safetensors, or a "
                                              "DeepSpeed mp_rank_00_model_states.pt"})
    out_dir: str = field(metadata={"positional": True, "help": "output folder (save_pretrained layout)"})
    config: Optional[str] = field(default=None, metadata={"help": "our config.json to convert into (default: inferred)"})
    num_attention_heads: Optional[int] = field(default=None, metadata={
        "help": "default: the preset of the hidden size (Ti, S, B, L)"})
    top_k: Optional[int] = field(default=None, metadata={"help": "experts per token (not stored; default 2)"})
    vision_type_embedding: bool = field(default=False, metadata={
        "help": "the reference ran with VIDEO_EMBED.ADD_TYPE_EMBED=True"})
    ignore_key: list[str] = field(default_factory=list, metadata={
        "action": "extend", "metavar": "PATTERN",
        "help": "fnmatch pattern of reference keys to leave out on purpose (repeatable)"})
    no_processor: bool = field(default=False, metadata={"help": "do not write the processor files"})


def main(argv=None):
    from modeling_uniperceiver_moe.command_line import parse_script_arguments

    args = parse_script_arguments(ConvertArguments, argv, prog="python -m hub_cards.convert_reference",
                                  description=__doc__.split("\n\n")[0])
    try:
        reference = load_reference_checkpoint(args.checkpoint)
        if args.config:
            from modeling_uniperceiver_moe import UniPerceiverMoEConfig

            config = UniPerceiverMoEConfig.from_json_file(args.config)
        else:
            overrides = {k: v for k, v in (("num_attention_heads", args.num_attention_heads), ("moe_top_k", args.top_k))
                         if v is not None}
            config = infer_config(reference, **overrides)
        _, report = save_converted(reference, args.out_dir, config, processor=not args.no_processor,
                                   vision_type_embedding=args.vision_type_embedding, ignore=args.ignore_key)
    except ConversionError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out_dir}: {report['placed']} tensors placed, {len(report['checked'])} checked, "
          f"{len(report['dropped'])} dropped by rule, {len(report['ignored'])} ignored on request")
    for key, reason in report["dropped"].items():
        print(f"  dropped {key}: {reason}")
    return report


if __name__ == "__main__":
    main()
