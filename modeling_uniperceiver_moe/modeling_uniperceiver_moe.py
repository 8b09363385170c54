"""PyTorch Uni-Perceiver-MoE: a shared multimodal encoder with conditional mixture-of-experts projections.

Reading order: outputs, position helpers, embeddings, the MoE linear (its eager implementation states the
maths) and its gate, attention, MLP, layer, encoder, pre-trained base, base model, similarity head. The
faster implementation of the expert linears (`experts_implementation="grouped_mm"`, the default) lives in
`moe_implementations.py`; routers, route grouping and dispatch bookkeeping in `routing.py`.

Sequence layout of every forward pass (L tokens):
`[SPE] vision tokens (frames x patches) text tokens [caption placeholders]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_uniperceiver_moe import MODALITIES, UniPerceiverMoEConfig
from .moe_implementations import (  # the fast experts implementation, `experts_implementation="grouped_mm"`
    cast_into,
    combine_assignments,
    compute_dtype,
    dispatch_assignments,
    expert_rows,
    matmul_dtype,
    merge_experts,
    merged_forward,
    permute_rows,
    token_forward,
)
from .routing import (
    FoldedRouter,
    GateDecision,
    MergedDispatch,
    MergedExperts,
    RouteGroups,
    RouterLinear,
    TokenDispatch,
    build_router,
    build_token_dispatch,
    check_id_range,
    distinct_route_key_tables,
    expert_capacity,
    layer_entries,
    load_balancing_loss,
    repeated_slices_cut,
    route_key_signature,
    route_rows,
    router_z_loss,
    select_top_k,
    to_device,
)

try:  # transformers >= 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    from torch.nn import init

try:  # FSDP's parameter shards (`is_sharded`)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = None

TEXT, IMAGE, VIDEO = (MODALITIES.index(m) for m in ("text", "image", "video"))


# =============================================================================================== outputs
@dataclass
class UniPerceiverMoEModelOutput(ModelOutput):
    """
    last_hidden_state: `[B, L, d]` encoder output (sequence layout in the module docstring).
    pooler_output: `[B, d]` the SPE token's output, the sequence representation.
    sequence_mask: `[B, L]` long, 1 for real (non-padding) tokens (the convention of `attention_mask`).
    text_start: index of the first text token in the sequence (1 + number of vision tokens).
    hidden_states / attentions: per layer, when asked.
    router_logits: per MoE gate decision, `[B, L, E]` float32 gate logits of every token (when asked).
    router_indices: per MoE gate decision, `[B, L, k]` chosen experts of every token (when asked).
    router_weights: per MoE gate decision, `[B, L, k]` float32 gate weights of those experts (when asked).
    aux_loss: scalar, weighted load-balancing + z-loss of the data-dependent routers (0 otherwise).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    sequence_mask: torch.LongTensor | None = None
    text_start: int | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    router_weights: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


@dataclass
class GenericPerceptionOutput(ModelOutput):
    """
    loss: scalar, candidate cross-entropy (+ router aux loss), when labels are given.
    logits: `[B, C]` (one query per input) or `[B, Q, C]` (several queries per input) scaled cosines.
    input_features: `[B, d]` or `[B, Q, d]` L2-normalised query features.
    input_projections: the same before the L2 normalisation (the head's LayerNorm + Linear output), what the
        reference's label prompt reads.
    target_features: `[C, d]` L2-normalised candidate features.
    aux_loss: scalar router auxiliary loss of both encodings.
    logit_scale: scalar, the task family's temperature used for `logits` (losses computed outside the
        model, e.g. over features gathered across processes, reuse it so it stays in the autograd graph).
    input_outputs: the encoder output of the input pass.
    hidden_states / attentions: per layer, of the input pass (when asked).
    target_hidden_states / target_attentions: per layer, of the candidate pass (when asked and the
        candidates were encoded here, not given as `target_features`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    input_features: torch.FloatTensor | None = None
    target_features: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    input_outputs: UniPerceiverMoEModelOutput | None = None
    logit_scale: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    target_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    target_attentions: tuple[torch.FloatTensor, ...] | None = None
    input_projections: torch.FloatTensor | None = None


@dataclass
class CandidateShard:
    """This process's share of a candidate set that every process scores against (class names, the word
    vocabulary), as the reference splits its shared targets across GPUs: the C candidates, padded to
    `world_size * ceil(C / world_size)` by repeating the first, are cut into equal contiguous slices; process
    `rank` encodes slice `rank`, and `gather` (`[n, d]` here -> `[world_size * n, d]`, the slices in rank
    order, differentiable: each slice gets the gradient of every process's loss) puts the features together.

    When the processes run different tasks in a step (the reference's per-process task draws), `sets` holds
    the candidate inputs (`target_*` rows) of every shared set any process scores in this step, in the same
    order on every process, and `own` the index of this process's set (None when it scores none, e.g.
    retrieval): each process encodes its slice of every set and one gather serves them all
    (`UniPerceiverMoEForGenericPerception.encode_candidate_sets`)."""

    rank: int
    world_size: int
    gather: Callable[[torch.Tensor], torch.Tensor]
    sets: tuple[dict, ...] = ()
    own: int | None = None

    def take(self, rows: torch.Tensor | None, count: int) -> torch.Tensor | None:
        """This process's slice of `rows` (`[C, ...]` with C = `count`; None stays None): `ceil(C / world_size)`
        rows, the last slices padded with copies of row 0."""
        if rows is None:
            return None
        size = -(-count // self.world_size)
        padding = size * self.world_size - count
        if padding:
            rows = torch.cat([rows, rows[:1].expand(padding, *rows.shape[1:])])
        return rows[self.rank * size:(self.rank + 1) * size]


# =============================================================================================== helpers
def sincos_1d_position_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sin-cos encoding `[N, dim]` (float64) of positions `[N]`: `dim / 2` frequencies 1 / base^(i / (dim / 2)),
    sines in the first half, cosines in the second. `dim` must be even."""
    half = dim // 2
    omega = 1.0 / (base ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int, device=None, scale: float = 1.0) -> torch.Tensor:
    """Fixed 2-D sin-cos positions `[grid_h * grid_w, dim]` (first half encodes rows, second half columns) of
    the patch coordinates times `scale` (`config.vision_position_scale`)."""
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    rows = torch.arange(grid_h, device=device)[:, None].expand(grid_h, grid_w).reshape(-1) * scale
    cols = torch.arange(grid_w, device=device)[None, :].expand(grid_h, grid_w).reshape(-1) * scale
    return torch.cat([sincos_1d_position_embedding(rows, dim // 2),
                      sincos_1d_position_embedding(cols, dim // 2)], dim=1).float()


def caption_attention_pattern(num_prefix: int, num_words: int, device=None) -> torch.Tensor:
    """Boolean `[L, L]` "parallel teacher forcing" mask (True = may attend), L = num_prefix + 2 * num_words.

    Layout: `prefix (SPE + vision) | w_0..w_{T-1} | q_0..q_{T-1}`.
    prefix tokens see the prefix only (so image states can be cached for generation);
    w_i sees the prefix and w_<=i; q_i sees the prefix, w_<i and itself.
    """
    length = num_prefix + 2 * num_words
    allowed = torch.zeros(length, length, dtype=torch.bool, device=device)
    allowed[:, :num_prefix] = True
    words = slice(num_prefix, num_prefix + num_words)
    queries = slice(num_prefix + num_words, length)
    causal = torch.ones(num_words, num_words, dtype=torch.bool, device=device).tril()
    allowed[words, words] = causal
    allowed[queries, words] = causal.tril(-1)
    allowed[queries, queries] = torch.eye(num_words, dtype=torch.bool, device=device)
    return allowed


def text_distance_slopes(num_heads: int, device=None) -> torch.Tensor:
    """`[H]` ALiBi slopes: 1, 1/2, 1/4, ... for the first ceil(H/2) heads (local ones: the first looks at its
    nearest words), 0 for the others (global: a query word such as text classification's inner [SPE] still
    reads the whole text through them)."""
    head = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.exp2(-head).masked_fill(head >= (num_heads + 1) // 2, 0.0)


def text_distance_bias(text_positions: torch.Tensor, num_heads: int, length: int, text_start: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias `[B, H, L, L]` (B may be 1): `-slope_h * |p_i - p_j|` between the text tokens
    at sequence indices `text_start..L-1`, whose text positions are `text_positions` `[B, L - text_start]`;
    0 wherever a query or a key is not text (SPE, patches, frames)."""
    slopes = text_distance_slopes(num_heads, text_positions.device)  # built where it is used: no host copy
    positions = text_positions.float()
    distance = (positions[:, :, None] - positions[:, None, :]).abs()  # [B, T, T]
    bias = torch.zeros(positions.shape[0], num_heads, length, length, dtype=dtype, device=positions.device)
    bias[:, :, text_start:, text_start:] = (-slopes[None, :, None, None] * distance[:, None]).to(dtype)
    return bias


def symmetric_cross_entropy(input_to_target: torch.Tensor, target_to_input: torch.Tensor, labels: torch.Tensor,
                            label_smoothing: float = 0.0) -> torch.Tensor:
    """Retrieval's loss: the input->target plus the target->input cross-entropy (each a mean over the local
    pairs), as the reference's two loss terms (i2t, t2i) that its retrieval loss weight then scales.

    input_to_target / target_to_input: `[B, P]` logits of the B local inputs over the P targets of the pool,
    and of the B local targets over the P inputs of the pool (P = B in one process, the gathered batch across
    processes in training); labels: `[B]` the pool position of each local pair."""
    forward = F.cross_entropy(input_to_target, labels, label_smoothing=label_smoothing)
    backward = F.cross_entropy(target_to_input, labels, label_smoothing=label_smoothing)
    return forward + backward


def drop_path_scales(max_rate: float, num_layers: int, batch: int, device, training: bool,
                     schedule: str = "linear") -> torch.Tensor | None:
    """Stochastic depth for every layer at once: `[num_layers, 2, B]` float32 per-sample scales of the
    attention and MLP residual branches of each layer: 0 (dropped) with the layer's rate, else
    `1 / (1 - rate)`. The rate grows linearly from 0 (first layer) to `max_rate` (last layer) under the
    "linear" schedule and is `max_rate` at every layer under "fixed".

    Drawn once per forward by the encoder and passed to the layers as a tensor, so layers with
    different rates share one compiled graph. None when not training or `max_rate` is 0.
    """
    if not training or max_rate == 0.0:
        return None
    if schedule == "fixed":
        keep = torch.full((num_layers,), 1.0 - max_rate, device=device, dtype=torch.float32)
    else:
        keep = 1.0 - torch.arange(num_layers, device=device, dtype=torch.float32) * (max_rate / max(num_layers - 1, 1))
    keep = keep[:, None, None]
    return (torch.rand(num_layers, 2, batch, device=device) < keep).float() / keep


# =============================================================================================== embeddings
class UniPerceiverMoETextPositions(nn.Embedding):
    """The learned text position table `[max_position_embeddings, d]`; its own class so that
    `config.text_position_init` can start it from sin-cos positions."""


def check_text_positions(highest: int, max_position_embeddings: int) -> None:
    """Refuse text positions the learned position table does not have."""
    if highest >= max_position_embeddings:
        raise ValueError(f"text positions reach {highest}, max_position_embeddings={max_position_embeddings}")


class UniPerceiverMoEEmbeddings(nn.Module):
    """Modality tokenizers: CLIP-BPE text, per-frame patch embedding for images/video, and the SPE token.

    Text: word + learned position + modality embedding. Vision: conv patches + fixed 2-D sin-cos
    position + learned temporal slot + modality embedding. One LayerNorm shared by all tokens.
    """

    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = UniPerceiverMoETextPositions(config.max_position_embeddings, d)
        self.modality_embeddings = nn.Embedding(config.num_modalities, d)
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size)
        self.temporal_embeddings = nn.Embedding(config.num_frames, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def embed_vision(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """pixel_values: `[B, C, H, W]` (image) or `[B, F, C, H, W]` (video) -> (`[B, F*P, d]`, modality)."""
        cfg = self.config
        if pixel_values.dim() == 4:
            pixel_values, modality = pixel_values.unsqueeze(1), IMAGE
        elif pixel_values.dim() == 5:
            modality = VIDEO
        else:
            raise ValueError(f"pixel_values must be [B, C, H, W] or [B, F, C, H, W], got shape {tuple(pixel_values.shape)}")
        batch, frames, channels, height, width = pixel_values.shape
        if channels != cfg.num_channels:
            raise ValueError(f"pixel_values has {channels} channels, the config expects num_channels={cfg.num_channels}")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of patch_size={cfg.patch_size} "
                f"(the processor resizes to image_size={cfg.image_size})"
            )
        if frames > cfg.num_frames:
            raise ValueError(f"video has {frames} frames, the model has num_frames={cfg.num_frames} temporal slots")
        weight_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.reshape(batch * frames, channels, height, width).to(weight_dtype))
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2).reshape(batch, frames, grid_h * grid_w, -1)
        spatial = sincos_2d_position_embedding(grid_h, grid_w, cfg.hidden_size, patches.device,
                                               cfg.vision_position_scale).to(patches.dtype)
        # embeddings are looked up by calling their modules (never by reading `.weight`), so offloading hooks
        # that load a module's weights when it is called see every use
        slots = torch.arange(frames, device=patches.device)
        if self.training and cfg.random_temporal_offset and frames < cfg.num_frames:
            # the reference's VIDEO_EMBED.POS_RANDOM: one random first slot per batch, so that an image or a short
            # clip trains every temporal slot (evaluation starts at slot 0)
            slots = slots + torch.randint(0, cfg.num_frames - frames + 1, (1,), device=patches.device)
        temporal = self.temporal_embeddings(slots)[:, None, :]
        tokens = patches + spatial[None, None] + temporal[None]
        tokens = tokens.reshape(batch, frames * grid_h * grid_w, -1)
        return tokens + self.modality_embedding(modality, tokens.device), modality

    def modality_embedding(self, modality: int, device) -> torch.Tensor:
        """`[d]` the embedding of modality id `modality`."""
        return self.modality_embeddings(torch.full((), modality, device=device))  # a fill, no host copy

    def embed_text(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids: `[B, T]` (or word embeddings `inputs_embeds` `[B, T, d]` in place of the
        ids) -> `[B, T, d]`. `forward` has checked the positions."""
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return (
            words
            + self.position_embeddings(position_ids)
            + self.modality_embedding(TEXT, position_ids.device)
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        caption_mode: bool,
        include_spe: bool = True,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Returns (embeddings `[B, L, d]`, token modality ids `[B, L]`, text_start).
        include_spe=False leaves out the SPE token (its state is in a cached prefix). inputs_embeds: `[B, T, d]`
        word embeddings in place of `input_ids`."""
        parts, modality_parts = [], []
        primary = TEXT
        if pixel_values is not None:
            vision, primary = self.embed_vision(pixel_values)
            parts.append(vision)
            modality_parts.append(torch.full(vision.shape[:2], primary, device=vision.device))
        if input_ids is not None or inputs_embeds is not None:
            batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
            device = (input_ids if inputs_embeds is None else inputs_embeds).device
            if position_ids is None:  # 0..T-1: checked from the shape, without reading a tensor
                check_text_positions(length - 1, self.config.max_position_embeddings)
                position_ids = torch.arange(length, device=device).expand(batch, length)
            else:  # given positions are read (on a GPU, the host waits for them)
                check_text_positions(int(position_ids.max()), self.config.max_position_embeddings)
            parts.append(self.embed_text(input_ids, position_ids, inputs_embeds))
            if caption_mode:  # placeholders q_i: SPE token at the position of w_i
                spe_ids = torch.full((batch, length), self.config.spe_token_id, dtype=torch.long, device=device)
                parts.append(self.embed_text(spe_ids, position_ids))
            text_len = length * (2 if caption_mode else 1)
            modality_parts.append(torch.full((batch, text_len), TEXT, device=device))
        batch = parts[0].shape[0]
        if include_spe:
            spe = self.word_embeddings(torch.full((1, 1), self.config.spe_token_id, device=parts[0].device))
            spe = spe.expand(batch, 1, -1)
            parts = [spe.to(parts[0].dtype)] + parts
            modality_parts = [torch.full((batch, 1), primary, device=parts[0].device)] + modality_parts
        embeddings = torch.cat(parts, dim=1)
        modality_ids = torch.cat(modality_parts, dim=1)
        text_start = int(include_spe) + (parts[int(include_spe)].shape[1] if pixel_values is not None else 0)
        return self.dropout(self.layer_norm(embeddings)), modality_ids, text_start


# =============================================================================================== MoE
@dataclass
class RoutingState:
    """Per-forward routing inputs shared by every MoE layer (built once by the encoder).

    groups: route-key partition of the N = B*L tokens (data-independent routings).
    merged: the merged experts for a table of route keys covering `groups.keys` (data-independent routings);
    merged_rows: `[G]` row of each group in `merged.keys`, None when that table is `groups.keys` itself.
    token_mask: `[N]` bool real tokens; sequence_index: `[N]` the sequence of each token.
    """

    token_mask: torch.Tensor
    sequence_index: torch.Tensor
    batch_size: int
    groups: RouteGroups | None = None
    merged: MergedExperts | None = None
    merged_rows: torch.Tensor | None = None
    prefix_cache: "PrefixCache | None" = None
    sorted_rows: "SortedRows | None" = None  # set when the batch has several route groups
    expert_weights: dict | None = None  # token/context routing: `UniPerceiverMoEModel.cast_experts`

    def for_layer(self, layer_idx: int) -> "RoutingState":
        """The state layer `layer_idx` runs with: its own merged experts and cast expert weights, named within
        the layer (`MergedExperts.for_layer`, `layer_entries`). Its code then refers to no layer index, so
        torch.compile builds one graph per shape for all MoE layers together, not one per layer."""
        if self.merged is None and self.expert_weights is None:
            return self
        return replace(self, merged=None if self.merged is None else self.merged.for_layer(layer_idx),
                       expert_weights=layer_entries(self.expert_weights, layer_idx))


@dataclass
class SortedRows:
    """Rows of a layer kept in route-group order: flat `[N, d]`, N = batch * length, sorted by
    `groups.order`. Per-token work (norms, projections, residuals) runs in this order; attention gets
    its `[B, L]` layout back through one gather of the qkv rows and one of its output."""

    groups: RouteGroups
    batch: int
    length: int
    row_sample: torch.Tensor  # [N] the sequence of each sorted row (drop path)

    def to_sorted(self, x: torch.Tensor) -> torch.Tensor:
        return permute_rows(x, self.groups.order, self.groups.inverse_order)

    def to_natural(self, x: torch.Tensor) -> torch.Tensor:
        return permute_rows(x, self.groups.inverse_order, self.groups.order)


@dataclass
class PrefixCache:
    """Per-layer keys and values of a sequence prefix (SPE + image tokens), for caption generation.

    A forward with `prefix_cache=PrefixCache(recording=True)` and only `pixel_values` fills `key_values`
    (one (`[B, H, P, hd]` keys, values) pair per layer). A forward with a filled cache and only
    `input_ids` (`caption_mode=True`) runs the text tokens alone, attending to the cached prefix as the
    full sequence would: the caption mask lets prefix tokens see only the prefix, so their states do not
    depend on the words. `select(index)` reorders the batch (beam search).
    """

    recording: bool = False
    key_values: list = field(default_factory=list)

    def select(self, index: torch.Tensor) -> "PrefixCache":
        return PrefixCache(False, [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.key_values])

    @property
    def length(self) -> int:
        return self.key_values[0][0].shape[2] if self.key_values else 0


EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (a shard, as FSDP keeps a parameter outside its module's forward)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def experts_implementation(config: UniPerceiverMoEConfig) -> str:
    """The implementation of the expert linears: `config._experts_implementation` as transformers sets it
    (`from_pretrained(..., experts_implementation=...)`, `model.set_experts_implementation(...)`), else
    `"grouped_mm"`."""
    return getattr(config, "_experts_implementation", None) or "grouped_mm"


class UniPerceiverMoELinear(nn.Module):
    """One linear projection with E experts stored as a single 3-D parameter.

    weight: `[E, out, in]`, bias: `[E, out]`. `forward(x [N, in], dispatch) -> [N, out]`:
    * [`MergedDispatch`] (modality / task / attribute routing, or a folded model): each route group g has
      the merged weight `W_g = sum_e gate[g, e] W_e` (bias likewise) and every token goes through its
      group's `W_g`. The model merges every linear once per step for all the passes of that step
      ([`MergedExperts`], built by `UniPerceiverMoEEncoder.merge_experts`, cached at inference); a
      dispatch without them merges here.
    * [`TokenDispatch`] (token / context routing): each token goes through its top-k experts and their
      outputs are summed with the gate weights; assignments past an expert's capacity carry weight 0.
    `config._experts_implementation` picks how: `"eager"` (below: the maths, one matmul per route group or
    expert) or `"grouped_mm"` (`moe_implementations`: one grouped GEMM, no loop; the default).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, name: str = "",
                 config: UniPerceiverMoEConfig | None = None):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.name = name  # "{layer}.{projection}": its entry in `MergedExperts.weights` and `cast_experts`
        self.projection = name.partition(".")[2]  # its entry in the layer's view (`MergedExperts.for_layer`)
        self.config = config
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features))

    @property
    def implementation(self) -> str:
        return "grouped_mm" if self.config is None else experts_implementation(self.config)

    def merged_parameters(self, gates: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """gates `[G, E]` -> merged weight `W_g = sum_e gates[g, e] W_e` `[G, out, in]` and bias `[G, out]`,
        summed in float32 (autocast off) and returned in `dtype`."""
        with torch.autocast(device_type=gates.device.type, enabled=False):
            gates = gates.float()
            experts = self.weight.float().reshape(self.num_experts, -1)
            if self.implementation == "eager":
                weight = (gates @ experts).to(dtype)
            else:
                weight = merge_experts(gates, experts, dtype)
            return weight.view(-1, self.out_features, self.in_features), (gates @ self.bias.float()).to(dtype)

    def forward(self, x: torch.Tensor, dispatch: MergedDispatch | TokenDispatch, rows_in_expert_order: bool = False
                ) -> torch.Tensor:
        """x: `[N, in]` tokens -> `[N, out]`; with `rows_in_expert_order` (top-1 token routing under
        `"grouped_mm"`, see `UniPerceiverMoEMLP`), x is `[N, in]` rows already in expert order and so is the
        result."""
        if self.implementation == "eager":
            if isinstance(dispatch, MergedDispatch):
                return self.eager_merged_forward(x, dispatch)
            return self.eager_token_forward(x, dispatch)
        if rows_in_expert_order:
            return expert_rows(self, x, dispatch)
        if isinstance(dispatch, MergedDispatch):
            return merged_forward(self, x, dispatch)
        return token_forward(self, x, dispatch)

    def eager_merged_forward(self, x: torch.Tensor, dispatch: MergedDispatch) -> torch.Tensor:
        """x `[N, in]` -> `[N, out]`: the rows of route group g through `W_g`, one group at a time."""
        dtype = compute_dtype(x)
        merged = dispatch.merged_parameters(self.projection)
        weight, bias = self.merged_parameters(dispatch.gates, dtype) if merged is None else merged
        groups = dispatch.groups
        row_group = groups.sorted_group if dispatch.rows_sorted else groups.token_group
        out = x.new_zeros(x.shape[0], self.out_features, dtype=dtype)
        for g in range(groups.num_groups):
            rows = (row_group == g).nonzero().squeeze(1)
            out = out.index_copy(0, rows, F.linear(x[rows].to(dtype), weight[g].to(dtype), bias[g].to(dtype)))
        return out

    def eager_token_forward(self, x: torch.Tensor, dispatch: TokenDispatch) -> torch.Tensor:
        """x `[N, in]` -> `[N, out]`: for each expert e, the tokens assigned to it through `W_e`, scaled by
        their gate weights and added to those tokens' outputs."""
        dtype = compute_dtype(x)
        out = x.new_zeros(x.shape[0], self.out_features, dtype=dtype)
        for e in range(self.num_experts):
            slots = (dispatch.expert_index == e).nonzero().squeeze(1)
            tokens = dispatch.token_index[slots]
            expert_out = F.linear(x[tokens].to(dtype), self.weight[e].to(dtype), self.bias[e].to(dtype))
            out = out.index_add(0, tokens, expert_out * dispatch.weight[slots, None].to(dtype))
        return out


def gate_route_input(config: UniPerceiverMoEConfig, keys: torch.Tensor) -> torch.Tensor:
    """What a data-independent gate decides on for route keys `[K]` / `[K, A]`: the keys themselves, or in a
    folded model their rows in the folded route table (a ValueError names keys it was not folded for)."""
    if config.folded_routes is None:
        return keys
    table = torch.tensor(config.folded_routes, device=keys.device, dtype=keys.dtype)
    return route_rows(keys, table, "folded into this model")


class UniPerceiverMoEGate(nn.Module):
    """One gate decision of a layer (attention or FFN), shared by the projections of that block."""

    def __init__(self, config: UniPerceiverMoEConfig, layer_idx: int, role: str):
        super().__init__()
        self.config, self.layer_idx, self.role = config, layer_idx, role
        self.name = f"{layer_idx}.{role}"  # its entry in `MergedExperts.gates`; `role` in the layer's view
        self.router = build_router(config, role)

    @property
    def num_choices(self) -> int:
        """Experts (or, in a folded model, folded routes) the gate chooses among."""
        return self.router.num_routes if isinstance(self.router, FoldedRouter) else self.config.moe_num_experts

    def decide(self, route_input: torch.Tensor) -> GateDecision:
        """Data-independent decision for K route keys (`[K]` ids, `[K, A]` attribute vectors, or `[K]` rows
        of the folded route table in a folded model)."""
        if isinstance(self.router, FoldedRouter):
            return self.router(route_input)
        cfg = self.config
        return select_top_k(self.router(route_input), cfg.moe_top_k, cfg.router_noise_std, self.training)

    def forward(self, hidden: torch.Tensor, state: RoutingState, rows_sorted: bool = False
                ) -> tuple[MergedDispatch | TokenDispatch, torch.Tensor]:
        """hidden: `[N, d]` normalised block input. Returns (dispatch, weighted aux loss scalar).
        rows_sorted: the layer holds its rows in route-group order (data-independent routings)."""
        cfg = self.config
        if state.merged is not None and self.role not in state.merged.gates:  # offloaded: decide here
            decision = self.decide(gate_route_input(cfg, state.merged.keys))
            gates = decision.dense_weights(self.num_choices)
            return (MergedDispatch(gates, state.groups, decision, rows_sorted, None, None),
                    self.route_balance_loss(decision, state, hidden, state.merged_rows))
        if state.merged is not None:  # data-independent: decided once per step in `merge_experts`
            decision, gates = state.merged.decisions[self.role], state.merged.gates[self.role]
            if state.merged_rows is not None:
                rows = state.merged_rows
                decision = GateDecision(*(t.index_select(0, rows) for t in (decision.logits, decision.expert_index, decision.expert_weight)))
                gates = gates.index_select(0, rows)
            dispatch = MergedDispatch(gates, state.groups, decision, rows_sorted, state.merged, state.merged_rows)
            return dispatch, self.route_balance_loss(decision, state, hidden)
        if cfg.moe_routing == "context":
            mask = state.token_mask.to(hidden.dtype)[:, None]
            sums = hidden.new_zeros(state.batch_size, hidden.shape[1]).index_add_(0, state.sequence_index, hidden * mask)
            counts = torch.zeros(state.batch_size, device=hidden.device).index_add_(0, state.sequence_index, mask[:, 0].float())
            context = sums / counts.clamp(min=1)[:, None].to(sums.dtype)
            seq_decision = select_top_k(self.router(context), cfg.moe_top_k, cfg.router_noise_std, self.training)
            decision = GateDecision(*(t.index_select(0, state.sequence_index) for t in (seq_decision.logits, seq_decision.expert_index, seq_decision.expert_weight)))
        else:
            decision = select_top_k(self.router(hidden), cfg.moe_top_k, cfg.router_noise_std, self.training)
        factor = cfg.moe_capacity_factor if self.training else cfg.moe_eval_capacity_factor
        capacity = expert_capacity(hidden.shape[0], cfg.moe_top_k, cfg.moe_num_experts, factor)
        dispatch = build_token_dispatch(decision, cfg.moe_num_experts, capacity)
        dispatch.experts = state.expert_weights
        aux = cfg.moe_aux_loss_coef * load_balancing_loss(decision, cfg.moe_num_experts, state.token_mask)
        aux = aux + cfg.moe_z_loss_coef * router_z_loss(decision, state.token_mask)
        return dispatch, aux

    def route_balance_loss(self, decision: GateDecision, state: RoutingState, hidden: torch.Tensor,
                           rows: torch.Tensor | None = None) -> torch.Tensor:
        """Data-independent routings: `moe_route_balance_coef` times the load-balancing loss of the route groups'
        decisions given to their tokens (each real token counts once), in training; 0 otherwise. `decision`
        holds one row per group of `state.groups`, or per key of a table whose row of group g is `rows[g]`."""
        coef = self.config.moe_route_balance_coef
        if coef == 0 or not self.training or isinstance(self.router, FoldedRouter):
            return hidden.new_zeros((), dtype=torch.float32)
        token_rows = state.groups.token_group if rows is None else rows.index_select(0, state.groups.token_group)
        per_token = GateDecision(*(t.index_select(0, token_rows)
                                   for t in (decision.logits, decision.expert_index, decision.expert_weight)))
        return coef * load_balancing_loss(per_token, self.config.moe_num_experts, state.token_mask)


def make_projection(config: UniPerceiverMoEConfig, layer_idx: int, name: str, in_features: int, out_features: int):
    """A dense `nn.Linear`, or an expert linear if `name` is an MoE projection of this layer."""
    if config.uses_moe(layer_idx, name):
        experts = len(config.folded_routes) if config.folded_routes is not None else config.moe_num_experts
        return UniPerceiverMoELinear(in_features, out_features, experts, name=f"{layer_idx}.{name}", config=config)
    return nn.Linear(in_features, out_features)


def apply_projection(linear: nn.Module, x: torch.Tensor, dispatch) -> torch.Tensor:
    """x: `[..., in]` -> `[..., out]` through a dense or expert linear."""
    if isinstance(linear, UniPerceiverMoELinear):
        return linear(x.reshape(-1, x.shape[-1]), dispatch).reshape(*x.shape[:-1], -1)
    return linear(x)


# =============================================================================================== attention
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query/key/value: `[B, H, L, Dh]`; attention_mask: additive `[B, 1 or H, L, L]`. Returns (`[B, L, H, Dh]`,
    weights)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class UniPerceiverMoEAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (dense or experts)."""

    def __init__(self, config: UniPerceiverMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        d = config.hidden_size
        self.qkv = make_projection(config, layer_idx, "attn_qkv", d, 3 * d)
        self.out_proj = make_projection(config, layer_idx, "attn_out", d, d)

    def forward(self, hidden: torch.Tensor, attention_mask, dispatch, output_attentions: bool = False,
                key_value_prompts: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                record_key_values: list | None = None, sorted_rows: SortedRows | None = None):
        """hidden: `[B, L, d]` -> (`[B, L, d]`, attention weights or None); with `sorted_rows`, flat rows
        `[N, d]` in route-group order in and out (the attention itself runs in `[B, L]` order).

        key_value_prompts: (keys, values) pairs prepended to every sequence's keys and values, each `[P, d]`
            (deep prompts, shared by the batch), `[B, P, d]` or `[B, H, P, hd]` (a cached prefix); every token
            may attend to them. record_key_values: a list this layer appends its own (keys, values) to.
        """
        if sorted_rows is None:
            batch, length, _ = hidden.shape
            qkv = apply_projection(self.qkv, hidden, dispatch)
        else:
            batch, length = sorted_rows.batch, sorted_rows.length
            qkv = sorted_rows.to_natural(apply_projection(self.qkv, hidden, dispatch))
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if record_key_values is not None:
            record_key_values.append((key, value))
        for prompt_keys, prompt_values in reversed(key_value_prompts or []):
            key, value, attention_mask = self.prepend_prompts(key, value, attention_mask, prompt_keys, prompt_values)
        implementation = self.config._attn_implementation
        if output_attentions:
            implementation = "eager"  # only eager returns the weights
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if implementation == "eager":
            attention = eager_attention_forward
        out, weights = attention(
            self, query, key, value, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling,
        )
        if sorted_rows is None:
            return apply_projection(self.out_proj, out.reshape(batch, length, -1), dispatch), weights
        out = sorted_rows.to_sorted(out.reshape(batch * length, -1))
        return apply_projection(self.out_proj, out, dispatch), weights

    def prepend_prompts(self, key, value, attention_mask, prompt_keys, prompt_values):
        """key/value `[B, H, L, hd]` -> `[B, H, P+L, hd]`; an additive mask `[B, 1, L, L]` gets P open columns."""
        batch = key.shape[0]

        def heads(prompt):
            if prompt.dim() == 4:
                return prompt.to(key.dtype)
            prompt = prompt.to(key.dtype)
            if prompt.dim() == 2:
                prompt = prompt.unsqueeze(0)
            prompt = prompt.reshape(prompt.shape[0], prompt.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
            return prompt.expand(batch, -1, -1, -1)

        prompt_keys, prompt_values = heads(prompt_keys), heads(prompt_values)
        key = torch.cat([prompt_keys, key], dim=2)
        value = torch.cat([prompt_values, value], dim=2)
        if attention_mask is not None:
            open_columns = attention_mask.new_zeros(*attention_mask.shape[:-1], prompt_keys.shape[2])
            attention_mask = torch.cat([open_columns.expand(attention_mask.shape[0], -1, -1, -1)
                                        if open_columns.shape[0] != attention_mask.shape[0] else open_columns,
                                        attention_mask], dim=-1)
        return key, value, attention_mask


class UniPerceiverMoEMLP(nn.Module):
    def __init__(self, config: UniPerceiverMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.fc1 = make_projection(config, layer_idx, "ffn_fc1", config.hidden_size, config.intermediate_size)
        self.fc2 = make_projection(config, layer_idx, "ffn_fc2", config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, dispatch) -> torch.Tensor:
        if self.keeps_expert_order(dispatch):
            rows = dispatch_assignments(hidden.reshape(-1, hidden.shape[-1]), dispatch)
            rows = self.fc2(self.dropout(self.act(self.fc1(rows, dispatch, True))), dispatch, True)
            return combine_assignments(rows, dispatch).reshape(*hidden.shape[:-1], -1)
        hidden = self.act(apply_projection(self.fc1, hidden, dispatch))
        return apply_projection(self.fc2, self.dropout(hidden), dispatch)

    def keeps_expert_order(self, dispatch) -> bool:
        """Top-1 token routing sends each token to the same single expert in fc1 and fc2, so under
        `"grouped_mm"` the hidden rows `[N, intermediate]` can stay in expert order between them: the same
        values as combining fc1's rows back to tokens and dispatching them again, without those two row
        permutations. (Under dropout the mask is drawn over the expert-ordered rows: same distribution,
        other draws.) Top-k > 1 sums k experts per token in between and takes the general path, as do
        wrapped projections and the eager implementation."""
        return (isinstance(dispatch, TokenDispatch) and dispatch.top_k == 1
                and experts_implementation(self.config) != "eager"
                and isinstance(self.fc1, UniPerceiverMoELinear) and isinstance(self.fc2, UniPerceiverMoELinear))


class UniPerceiverMoELayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


# =============================================================================================== layer
@dataclass
class LayerRouting:
    """What one layer's gates decided (for the model outputs)."""

    decisions: list[GateDecision]
    aux_loss: torch.Tensor


class UniPerceiverMoELayer(GradientCheckpointingLayer):
    """Pre-norm block: x + dp(ls1 * attn(norm1 x)); x + dp(ls2 * mlp(norm2 x)); gates see the normed input."""

    def __init__(self, config: UniPerceiverMoEConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attention = UniPerceiverMoEAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = UniPerceiverMoEMLP(config, layer_idx)
        use_scale = config.layer_scale_init > 0
        self.layer_scale1 = UniPerceiverMoELayerScale(d, config.layer_scale_init) if use_scale else nn.Identity()
        self.layer_scale2 = UniPerceiverMoELayerScale(d, config.layer_scale_init) if use_scale else nn.Identity()
        moe_here = layer_idx in config.moe_layer_indices()
        attn_moe = moe_here and any(p in config.moe_projections for p in ("attn_qkv", "attn_out"))
        ffn_moe = moe_here and any(p in config.moe_projections for p in ("ffn_fc1", "ffn_fc2"))
        self.attn_gate = UniPerceiverMoEGate(config, layer_idx, "attn") if attn_moe else None
        self.ffn_gate = UniPerceiverMoEGate(config, layer_idx, "ffn") if ffn_moe else None

    @property
    def has_gates(self) -> bool:
        """Whether this layer routes (holds an attention or FFN gate)."""
        return self.attn_gate is not None or self.ffn_gate is not None

    def gated_linears(self) -> list[tuple[UniPerceiverMoEGate, list[UniPerceiverMoELinear]]]:
        """Each gate of this layer with the expert linears it routes (none for a dense layer). Found by
        walking the blocks, so adapters that wrap the attention or MLP module keep them visible."""
        blocks = [(self.attn_gate, self.attention), (self.ffn_gate, self.mlp)]
        return [(gate, [m for m in block.modules() if isinstance(m, UniPerceiverMoELinear)]) for gate, block in blocks
                if gate is not None]

    def _gate(self, gate, normed: torch.Tensor, state: RoutingState, decisions: list, aux: list, rows_sorted: bool):
        if gate is None:
            return None
        dispatch, loss = gate(normed.reshape(-1, normed.shape[-1]), state, rows_sorted)
        decisions.append(dispatch.decision)
        aux.append(loss)
        return dispatch

    def forward(self, hidden: torch.Tensor, attention_mask, state: RoutingState, output_attentions: bool = False,
                *merged_tensors: torch.Tensor, drop_path_scale: torch.Tensor | None = None):
        """hidden: `[B, L, d]`. Returns (hidden, attention weights or None, weighted router aux loss, gate
        decisions). The aux loss is an output of its own, so activation checkpointing differentiates it.

        merged_tensors: this layer's merged experts (`MergedExperts.layer_tensors`), passed as arguments so
        that activation checkpointing (reentrant or not) treats them as inputs.
        drop_path_scale: `[2, B]` per-sample scales of the attention and MLP branches (stochastic depth,
        drawn by the encoder with `drop_path_scales`), or None.
        When the batch has several route groups and this layer has experts, the layer works on flat rows
        sorted by group (`state.sorted_rows`): one permutation in and one out instead of two per expert
        projection; only the attention core sees the `[B, L]` layout.
        """
        decisions, aux = [], []
        if merged_tensors:
            state = replace(state, merged=state.merged.with_layer_tensors(merged_tensors))
        batch, length, width = hidden.shape
        rows = state.sorted_rows if self.has_gates else None
        if rows is not None:
            hidden = rows.to_sorted(hidden.reshape(batch * length, width))
            if drop_path_scale is not None:  # one scale per sorted row
                drop_path_scale = drop_path_scale.index_select(1, rows.row_sample)[:, :, None]
        elif drop_path_scale is not None:
            drop_path_scale = drop_path_scale[:, :, None, None]
        normed = self.norm1(hidden)
        dispatch = self._gate(self.attn_gate, normed, state, decisions, aux, rows is not None)
        cache, kwargs = state.prefix_cache, {}
        if cache is not None:
            if cache.recording:
                kwargs["record_key_values"] = cache.key_values
            else:
                kwargs["key_value_prompts"] = [cache.key_values[self.layer_idx]]
        if rows is not None:
            kwargs["sorted_rows"] = rows
        attn_out, weights = self.attention(normed, attention_mask, dispatch, output_attentions, **kwargs)
        hidden = hidden + self._drop_path(self.layer_scale1(attn_out), drop_path_scale, 0)
        normed = self.norm2(hidden)
        dispatch = self._gate(self.ffn_gate, normed, state, decisions, aux, rows is not None)
        mlp_out = self.mlp(normed, dispatch)
        hidden = hidden + self._drop_path(self.layer_scale2(mlp_out), drop_path_scale, 1)
        if rows is not None:
            hidden = rows.to_natural(hidden).view(batch, length, width)
        aux_loss = torch.stack(aux).sum() if aux else hidden.new_zeros((), dtype=torch.float32)
        return hidden, weights, aux_loss, decisions

    @staticmethod
    def _drop_path(branch: torch.Tensor, scale: torch.Tensor | None, which: int) -> torch.Tensor:
        """branch `[B, L, d]` or sorted rows `[N, d]`; scale `[2, B, 1, 1]` or `[2, N, 1]` (or None)."""
        return branch if scale is None else branch * scale[which].to(branch.dtype)


# =============================================================================================== encoder
class UniPerceiverMoEEncoder(nn.Module):
    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(UniPerceiverMoELayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.layers_per_span: int | None = None  # `compile_encoder`: consecutive layers run as one call; None: all

    def merge_experts(self, key_tables: list[torch.Tensor], dtype: torch.dtype) -> list[MergedExperts]:
        """Gate decisions and merged weights of every data-independent MoE linear, for one or more tables
        of route keys (each `[K_i]` ids or `[K_i, A]` attribute vectors), in `dtype`.

        The tables are merged together, one GEMM over the experts per linear, and returned split into one
        [`MergedExperts`] per table (views), so each encoder pass gets exactly its own groups' weights. A
        folded model looks the keys up in its route table (a ValueError names keys it was not folded for).
        """
        keys = torch.cat(key_tables)
        sizes = [table.shape[0] for table in key_tables]
        route_input = gate_route_input(self.config, keys)
        merged = [MergedExperts(table) for table in key_tables]
        for layer in self.layers:
            for gate, linears in layer.gated_linears():
                decision = gate.decide(route_input)
                gates = decision.dense_weights(gate.num_choices)
                for part, logits, index, weight, dense in zip(merged, *(t.split(sizes) for t in (
                        decision.logits, decision.expert_index, decision.expert_weight, gates))):
                    part.decisions[gate.name], part.gates[gate.name] = GateDecision(logits, index, weight), dense
                for linear in linears:
                    weight, bias = linear.merged_parameters(gates, dtype)
                    for part, w, b in zip(merged, weight.split(sizes), bias.split(sizes)):
                        part.weights[linear.name] = (w, b)
        return merged

    def layer_spans(self) -> list[range]:
        """The layer indices run by one call of `run_layer_span` each: spans of `layers_per_span` consecutive
        layers (the last may be shorter), or the whole stack. Compiled, each call is one graph (per shape),
        and spans holding the same kinds of layers in the same order share it."""
        count = len(self.layers)
        step = self.layers_per_span or count
        return [range(start, min(start + step, count)) for start in range(0, count, step)]

    def forward(self, hidden, attention_mask, state, output_attentions=False, output_hidden_states=False):
        all_hidden = (hidden,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        routing = []
        scales = drop_path_scales(self.config.drop_path_rate, len(self.layers), hidden.shape[0], hidden.device,
                                  self.training, self.config.drop_path_schedule)
        for span in self.layer_spans():
            layers = tuple(self.layers[i] for i in span)
            # each MoE layer gets its own view of the step's experts, built here so that the span's code refers
            # to no layer index (`RoutingState.for_layer`); a dense layer reads no experts
            states = tuple(state.for_layer(i) if self.layers[i].has_gates else state for i in span)
            span_scales = tuple(None if scales is None else scales[i] for i in span)
            hidden, outputs = self.run_layer_span(layers, hidden, attention_mask, states, span_scales,
                                                  output_attentions)
            for layer_hidden, weights, aux_loss, decisions in outputs:
                routing.append(LayerRouting(decisions, aux_loss))
                if output_hidden_states:
                    all_hidden += (layer_hidden,)
                if output_attentions:
                    all_attn += (weights,)
        return hidden, all_hidden, all_attn, routing

    @staticmethod
    def run_layer_span(layers: tuple, hidden: torch.Tensor, attention_mask, states: tuple, scales: tuple,
                       output_attentions: bool = False) -> tuple[torch.Tensor, list[tuple]]:
        """Consecutive layers applied to hidden `[B, L, d]`, each with its routing state and drop-path scales
        `[2, B]` (or None). Returns the last hidden state and, per layer, (hidden, attention weights or None,
        router aux loss, gate decisions). `compile_encoder` replaces it by its compiled version."""
        outputs = []
        for layer, state, scale in zip(layers, states, scales):
            # only a checkpointed layer needs its merged experts as arguments (its inputs); others read the state
            checkpointed = layer.gradient_checkpointing and layer.training and torch.is_grad_enabled()
            merged_tensors = state.merged.layer_tensors() if checkpointed and state.merged is not None else ()
            hidden, weights, aux_loss, decisions = layer(hidden, attention_mask, state, output_attentions,
                                                         *merged_tensors, drop_path_scale=scale)
            outputs.append((hidden, weights, aux_loss, decisions))
        return hidden, outputs


# =============================================================================================== pre-trained base
class UniPerceiverMoEPreTrainedModel(PreTrainedModel):
    config_class = UniPerceiverMoEConfig
    config: UniPerceiverMoEConfig
    base_model_prefix = "uniperceiver"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniPerceiverMoELayer", "UniPerceiverMoEEmbeddings"]
    _supports_sdpa = True
    # the gates are computed in float32 whatever the model's dtype: store them so under fp16 and bf16 alike
    _keep_in_fp32_modules = ["router"]
    _keep_in_fp32_modules_strict = ["router"]
    # Where `trust_remote_code` finds each class in a saved folder (save_pretrained copies the code files):
    # the encoder and the head both load from a checkpoint of either.
    REMOTE_CODE_MAP = {"AutoConfig": "configuration_uniperceiver_moe.UniPerceiverMoEConfig",
                       "AutoModel": "modeling_uniperceiver_moe.UniPerceiverMoEModel",
                       "AutoModelForPreTraining": "modeling_uniperceiver_moe.UniPerceiverMoEForGenericPerception"}

    def __init__(self, config: UniPerceiverMoEConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        self.config.auto_map = {**self.REMOTE_CODE_MAP, **(getattr(self.config, "auto_map", None) or {})}

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """Both implementations can be switched at any time (`set_experts_implementation`): every expert
        linear reads `experts_implementation(config)` when it is called."""
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """transformers' check of `experts_implementation=...`: ours are `EXPERTS_IMPLEMENTATIONS`, default
        `"grouped_mm"`."""
        chosen = "grouped_mm" if requested_experts is None else requested_experts
        if chosen not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation={chosen!r} is not supported by {type(self).__name__}; "
                             f"choose one of {EXPERTS_IMPLEMENTATIONS}")
        return chosen

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs):
        """As `PreTrainedModel.resize_token_embeddings`, refusing sizes that would drop the special tokens
        ([MASK], [GEN], [SPE] are the last ids and every forward uses [SPE])."""
        specials = (self.config.mask_token_id, self.config.gen_token_id, self.config.spe_token_id)
        if new_num_tokens is not None and new_num_tokens <= max(specials):
            raise ValueError(f"resize_token_embeddings({new_num_tokens}) would drop the special tokens "
                             f"(ids {specials}, [SPE] is used by every forward): keep at least {max(specials) + 1}")
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    def checkpoint_activations(self, use_reentrant: bool | None = None) -> None:
        """Turn on activation (gradient) checkpointing of the encoder layers through the name this
        transformers has: `activation_checkpointing_enable` (5.24+), else `gradient_checkpointing_enable`.
        Both torch modes (`use_reentrant` True or False; None = transformers' default) give the gradients
        of a run without checkpointing: the merged experts enter each layer as arguments and the router
        aux loss leaves it as an output."""
        options = None if use_reentrant is None else {"use_reentrant": use_reentrant}
        if hasattr(self, "activation_checkpointing_enable"):
            self.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    def config_flags(self, output_attentions, output_hidden_states, output_router_logits, return_dict
                     ) -> tuple[bool, bool, bool, bool]:
        """The forward flags, each `None` taking the config's value (as in every transformers model)."""
        config = self.config
        return (bool(config.output_attentions if output_attentions is None else output_attentions),
                bool(config.output_hidden_states if output_hidden_states is None else output_hidden_states),
                bool(config.output_router_logits if output_router_logits is None else output_router_logits),
                bool(config.return_dict if return_dict is None else return_dict))

    def compile_encoder(self, layers_per_graph: int | None = None, **compile_kwargs) -> None:
        """`torch.compile` the encoder in place (its layers, in spans, and `merge_experts`, the per-step expert
        merge); embeddings, route grouping and heads stay eager.

        layers_per_graph: how many consecutive layers one compiled call runs (`UniPerceiverMoEEncoder.layer_spans`).
        None compiles the whole stack as one region: one graph per input shape and grad mode, the fewest
        calls per step (each compiled call costs the host its guard checks and, with CUDA graphs, a graph
        launch), the longest compilation. 1 compiles each layer (regional compilation): layers of one kind
        (dense or MoE) share their graphs, so a mixed step needs about 2 kinds x shapes x {train, eval}
        graphs, each small. In between, spans of the same layer kinds share their graphs (with an MoE layer
        every other layer, spans of 2, 4 or 6 are all alike). Raise `torch._dynamo.config.recompile_limit`
        above its default 8 if batch shapes vary a lot. compile_kwargs go to `torch.compile`, e.g.
        `dynamic=False` for fixed batch shapes or `mode="reduce-overhead"` (CUDA graphs). Eager and compiled
        encoders compute the same function."""
        if layers_per_graph is not None and layers_per_graph < 1:
            raise ValueError(f"layers_per_graph must be None (the whole stack) or >= 1, got {layers_per_graph}")
        encoder = self.base_model.encoder
        encoder.layers_per_span = layers_per_graph
        encoder.run_layer_span = torch.compile(UniPerceiverMoEEncoder.run_layer_span, **compile_kwargs)
        if "merge_experts" not in vars(encoder):  # not compiled yet
            encoder.merge_experts = torch.compile(encoder.merge_experts, **compile_kwargs)

    def projection_std(self, fan_in: int) -> float:
        """Init std of a projection weight with `fan_in` inputs: `1 / sqrt(fan_in)` under the "fan_in"
        scheme (a unit-variance input gives a unit-variance output), else `initializer_range`."""
        if self.config.initializer_scheme == "fan_in":
            return fan_in ** -0.5
        return self.config.initializer_range

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, RouterLinear):  # near-uniform gates under either scheme
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()  # in_features, or in_channels * kernel area
            init.trunc_normal_(module.weight, std=self.projection_std(fan_in))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, UniPerceiverMoELinear):
            init.trunc_normal_(module.weight, std=self.projection_std(module.in_features))
            init.zeros_(module.bias)
        elif isinstance(module, UniPerceiverMoETextPositions) and self.config.text_position_init == "sincos":
            # the reference's text sin-cos base (twice the table length: the slowest frequency spans the table),
            # entries of RMS 1/sqrt(2) scaled to the RMS `initializer_range` of the word embeddings
            positions = torch.arange(module.num_embeddings, device=module.weight.device)
            encoding = sincos_1d_position_embedding(positions, module.embedding_dim, base=2.0 * module.num_embeddings)
            encoding = (encoding * (std * math.sqrt(2.0))).to(module.weight.dtype)
            if hasattr(init, "copy_"):  # transformers' version skips a table loaded from a checkpoint
                init.copy_(module.weight, encoding)
            else:
                module.weight.data.copy_(encoding)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, UniPerceiverMoELayerScale):
            init.constant_(module.gamma, module.init_value)
        elif isinstance(module, UniPerceiverMoELogitScales):
            init.constant_(module.log_scale, self.config.logit_scale_init)
        elif isinstance(module, UniPerceiverMoEWordBias):
            init.zeros_(module.bias)


# =============================================================================================== base model
def _clone_merged(merged: MergedExperts) -> MergedExperts:
    """A copy of `merged` that owns its tensors (kept across calls by the inference merge cache)."""
    return MergedExperts(
        merged.keys.clone(),
        {name: GateDecision(*(t.clone() for t in (d.logits, d.expert_index, d.expert_weight)))
         for name, d in merged.decisions.items()},
        {name: g.clone() for name, g in merged.gates.items()},
        {name: (w.clone(), b.clone()) for name, (w, b) in merged.weights.items()},
    )


def _mark_static_addresses(merged: MergedExperts) -> None:
    """Tell the compiler that the cached merge's tensors keep their addresses between calls: under CUDA
    graphs (`mode="reduce-overhead"`) an input not marked so is copied into the graph's own buffer at every
    replay (measured: 109 device copies per B inference step, 0.44 ms of its 12.7 ms of GPU time). If a
    new cache entry moves them, the graphs are re-recorded, not recompiled."""
    tensors = [merged.keys, *merged.gates.values(), *(t for pair in merged.weights.values() for t in pair)]
    tensors += [t for d in merged.decisions.values() for t in (d.logits, d.expert_index, d.expert_weight)]
    _mark_static(tensors)


def _mark_static(tensors) -> None:
    """Mark inference-cache tensors as fixed-address compiler inputs (see `_mark_static_addresses`)."""
    for tensor in tensors:
        torch._dynamo.mark_static_address(tensor, guard=False)


def _cast_buffer(source: torch.Tensor, dtype: torch.dtype, kept: torch.Tensor | None) -> torch.Tensor:
    """`kept` if it can hold `source` in `dtype` (same shape and device), else a new fixed-address buffer.

    `kept` is detached in place first (same tensor object, so its fixed-address mark stays): it still
    carries the autograd node of its last cast, and the next cast would otherwise link to it, growing a
    chain of one node per parameter update that every backward walks. A backward still pending keeps its
    own reference to that node."""
    if kept is not None and kept.shape == source.shape and kept.dtype == dtype and kept.device == source.device:
        return kept.detach_()
    buffer = torch.empty(source.shape, dtype=dtype, device=source.device)
    _mark_static([buffer])
    return buffer


class OptimizerSteps:
    """How many steps any `torch.optim` optimizer has taken in this process, counted by a global step
    post-hook. Part of the model caches' key (`_parameter_versions`): a fused optimizer (torch's fused AdamW,
    the trainer's default) updates parameters in place without bumping their version counters, so address
    and version alone would keep a cache built before the step."""

    count = 0

    @classmethod
    def hook(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


register_optimizer_step_post_hook(OptimizerSteps.hook)


class _ForwardCache:
    """One (key, value) kept by the model between forwards (merged or cast experts). Copies and pickles of
    the model start with it empty: its key names the source's parameter addresses, so a copy could never
    hit it, and in training it holds tensors with autograd history, which `copy.deepcopy` refuses."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry: tuple | None = None

    def __deepcopy__(self, memo) -> "_ForwardCache":
        return _ForwardCache()

    def __reduce__(self):
        return (_ForwardCache, ())


def module_links(root: nn.Module, targets: list[nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, attribute name, child) link on the paths from `root` down to each of `targets` and
    their submodules: the structure a cache of those modules depends on. If any `parent._modules[name]
    is child` stops holding, a module on the way was replaced or wrapped (e.g. by an adapter)."""
    names = {id(module): name for name, module in root.named_modules(remove_duplicate=False)}
    links, seen = [], set()
    for target in targets:
        for module in target.modules():
            path = names.get(id(module))
            if not path:
                continue
            parent = root
            for part in path.split("."):
                child = parent._modules[part]
                if (id(parent), part) not in seen:
                    seen.add((id(parent), part))
                    links.append((parent, part, child))
                parent = child
    return links


def _route_keys_per_token(values: torch.Tensor, batch: int, length: int, name: str, trailing: tuple[int, ...]):
    """Broadcast `[B, *trailing]` (per sequence) or check `[B, L, *trailing]` (per token)."""
    if values.shape == (batch, *trailing):
        return values[:, None].expand(batch, length, *trailing)
    if values.shape == (batch, length, *trailing):
        return values
    raise ValueError(
        f"{name} must have shape {(batch, *trailing)} (one per sequence) or {(batch, length, *trailing)} "
        f"(one per token of the {length}-token sequence), got {tuple(values.shape)}"
    )


BROADCAST_READ_MIN_ENTRIES = 2048  # smaller broadcast route inputs are read whole: cutting costs more than it saves


class UniPerceiverMoEModel(UniPerceiverMoEPreTrainedModel):
    """The shared encoder. Inputs: text (`input_ids`), images/video (`pixel_values`) or both, plus the
    route keys the task layer provides (`attribute_vectors`, `task_ids`, `modality_ids`)."""

    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__(config)
        self.embeddings = UniPerceiverMoEEmbeddings(config)
        self.encoder = UniPerceiverMoEEncoder(config)
        self._merge_cache = _ForwardCache()  # (key, MergedExperts) of the last inference forward; never saved
        self._merge_slots: tuple | None = None  # see `_gated_modules`
        self._cast_cache = _ForwardCache()  # (key, grad pattern, cast expert weights) of the last cast
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _route_keys(self, modality_ids, attribute_vectors, task_ids, batch, length, check_ids: bool = True):
        """Each token's route key, `[B, L]` ids or `[B, L, A]` vectors. check_ids: range-check the ids here
        (callers that group the keys with `distinct_route_keys`, which checks them too, skip it)."""
        routing = self.config.moe_routing
        if routing == "attribute":
            if attribute_vectors is None:
                raise ValueError("moe_routing='attribute' needs attribute_vectors (built by the task registry)")
            return _route_keys_per_token(attribute_vectors.float(), batch, length, "attribute_vectors", (self.config.attribute_dim,))
        if routing == "task":
            if task_ids is None:
                raise ValueError("moe_routing='task' needs task_ids")
            if check_ids:
                check_id_range(task_ids, self.config.num_tasks, "task")
            return _route_keys_per_token(task_ids.long(), batch, length, "task_ids", ())
        if check_ids:
            check_id_range(modality_ids, self.config.num_modalities, "modality")
        return _route_keys_per_token(modality_ids.long(), batch, length, "modality_ids", ())

    def route_key_table(self, modality_ids=None, attribute_vectors=None, task_ids=None, return_groups: bool = False):
        """The distinct route keys in some route inputs (`[K]` ids or `[K, A]` attribute vectors), for
        `merged_experts`; None for routings that need no merge. Modality routing takes every modality.
        With `return_groups`: (table, each flattened route input's row in it, or None for modality).

        Route inputs may stay on the host (CPU tensors, as the task registry builds them) while the model
        runs on a GPU: they are then read there, and the results reach the model's device without making
        the host wait for the GPU (`routing.to_device`). Route inputs on the GPU cost one small read."""
        routing = self.config.moe_routing
        if not self.config.is_data_independent_routing:
            return (None, None) if return_groups else None
        route_input = {"attribute": attribute_vectors, "task": task_ids}.get(routing)
        return self.route_key_tables([route_input], return_groups)[0]

    def execution_device(self) -> torch.device:
        """The device the forward computes on: the word embeddings' device, or, when accelerate offloads them
        (their weight then waits on the meta device), the device its hook runs them on."""
        embeddings = self.embeddings.word_embeddings
        if embeddings.weight.device.type != "meta":
            return embeddings.weight.device
        device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
        return torch.device("cpu") if device is None else torch.device(device)

    def experts_offloaded(self) -> bool:
        """True when router or expert weights are not held whole between calls: offloaded by accelerate (on
        the meta device) or sharded by FSDP (`DTensor` shards, gathered for their layer's forward): the
        encoder then neither merges nor casts experts ahead of the layers; each gate decides and each
        expert linear merges inside its own call, when its weights are loaded."""
        for module, name in self._gated_modules()[0]:  # a plain loop over `is_meta`: ~17 us for B's 120 slots
            parameter = module._parameters[name]
            if parameter is not None and (parameter.is_meta or is_sharded(parameter)):
                return True
        return False

    def route_key_tables(self, route_inputs: list[torch.Tensor | None], return_groups: bool = False) -> list:
        """`route_key_table` of several route inputs of this model's routing (attribute vectors, or task ids),
        e.g. the inputs and the candidates of a step, read from the GPU in one go (each read waits for all
        the work queued before it)."""
        routing, device = self.config.moe_routing, self.execution_device()
        if routing == "modality":
            table = torch.arange(self.config.num_modalities, device=device)
            return [(table, None) if return_groups else table for _ in route_inputs]
        if any(values is None for values in route_inputs):
            raise ValueError(f"moe_routing={routing!r} needs "
                             + ("attribute_vectors (built by the task registry)" if routing == "attribute" else "task_ids"))
        # large route inputs given as a broadcast (stride 0, as the task registry gives one attribute row to
        # every candidate) are read once per distinct slice; each token's group is then broadcast back
        key_dims = 1 if routing == "attribute" else 0
        cut = [repeated_slices_cut(values, key_dims) if values.numel() >= BROADCAST_READ_MIN_ENTRIES else values
               for values in route_inputs]
        if routing == "attribute":
            flat = [values.float().reshape(-1, self.config.attribute_dim) for values in cut]
            tables = distinct_route_key_tables(flat, return_groups=return_groups)
        else:
            flat = [values.long().reshape(-1) for values in cut]
            tables = distinct_route_key_tables(flat, self.config.num_tasks, return_groups, name="task")
        if not return_groups:
            return [to_device(table, device) for table in tables]
        found = []
        for values, part, (table, groups) in zip(route_inputs, cut, tables):
            lead = values.dim() - key_dims
            if part is not values:  # each token's group, broadcast back from the distinct slice's, as a dense
                # tensor like the groups of any other route input (what `to_device` pins for a GPU)
                groups = groups.view(part.shape[:lead]).expand(values.shape[:lead]).contiguous().view(-1)
            found.append((to_device(table, device), to_device(groups, device)))
        return found

    def merged_experts(self, key_tables: list[torch.Tensor], dtype: torch.dtype) -> list[MergedExperts]:
        """`encoder.merge_experts(key_tables, dtype)`: every data-independent MoE linear merged, in one go,
        for each table of route keys (one table per encoder pass that will use it). At inference (eval
        mode, no grad) the result is reused while the keys, the dtype and the routers' and experts'
        parameters are unchanged (in-place updates bump a parameter's version, an optimizer step the count of
        `OptimizerSteps`)."""
        if self.training or torch.is_grad_enabled():
            self._merge_cache.entry = None  # free what an evaluation left behind
            return self.encoder.merge_experts(key_tables, dtype)
        return self._cached_merge(key_tables, dtype)

    def merge_for_step(self, attribute_vectors=None, task_ids=None, target_attribute_vectors=None, target_task_ids=None
                       ) -> tuple[MergedExperts | None, MergedExperts | None]:
        """One expert merge for both encoder passes of a step, inputs and candidates (the similarity head's
        forward, or any caller that encodes two batches with the same parameters): each expert is read
        once per step and its gradient comes back through one merge backward. Returns the merged experts
        of the input pass and of the candidate pass; (None, None) where the routing needs no merge or a
        route input is missing or malformed (each encoder pass then merges alone or raises its own error)."""
        config = self.config
        if not config.is_data_independent_routing:
            return None, None
        if self.experts_offloaded():
            return None, None
        weight = self.embeddings.word_embeddings.weight  # the model's dtype (no walk over parameters)
        dtype = matmul_dtype(self.execution_device(), weight.dtype)
        if config.moe_routing == "attribute":
            pair = (attribute_vectors, target_attribute_vectors)
            if any(v is None or v.dim() not in (2, 3) or v.shape[-1] != config.attribute_dim for v in pair):
                return None, None
            found = self.route_key_tables(list(pair), return_groups=True)
        elif config.moe_routing == "task":
            if task_ids is None or target_task_ids is None:
                return None, None
            found = self.route_key_tables([task_ids, target_task_ids], return_groups=True)
        else:  # modality: one table of every modality, shared (each pass picks its rows)
            merged = self.merged_experts([self.route_key_table()], dtype)[0]
            return merged, merged
        merged = self.merged_experts([table for table, _ in found], dtype)
        return tuple(m.for_batch(groups) for m, (_, groups) in zip(merged, found))  # each pass knows its groups

    @torch.compiler.disable  # host-side cache bookkeeping: under `torch.compile(model)` it runs eagerly
    def _cached_merge(self, key_tables: list[torch.Tensor], dtype: torch.dtype) -> list[MergedExperts]:
        key = (tuple(route_key_signature(table) for table in key_tables), dtype, self._parameter_versions())
        if self._merge_cache.entry is None or self._merge_cache.entry[0] != key:
            self._merge_cache.entry = None  # free the old merge before building the new one
            merged = self.encoder.merge_experts(key_tables, dtype)
            if "merge_experts" in vars(self.encoder):  # compiled: under CUDA graphs its outputs live in the
                merged = [_clone_merged(m) for m in merged]  # graph pool, overwritten by the next replay
            for entry in merged:
                _mark_static_addresses(entry)
            self._merge_cache.entry = (key, merged)
        return self._merge_cache.entry[1]

    @torch.compiler.disable  # host-side cache bookkeeping: under `torch.compile(model)` it runs eagerly
    def cast_experts(self, dtype: torch.dtype) -> dict | None:
        """Token/context routing: every expert linear's weight and bias in `dtype` (the autocast dtype), cast
        once into buffers kept by the model and reused while the parameters are unchanged (the inference
        merge cache's rule: same addresses and versions, no optimizer step since), for inference and training
        alike.

        Without it each encoder pass casts all E float32 experts of every projection (about 2 GB read and
        1 GB written per pass of B with 8 experts) and, in training, casts their gradients back per pass.
        With grad enabled the cast is differentiable (`cast_into`): the passes of a step (inputs and
        candidates) share one cast, autograd sums their compute-dtype gradients, and one cast back per
        expert linear reaches the float32 parameters. The buffers cost 2 bytes per expert parameter in
        bf16 (0.68 GB for B with 8 experts) and keep their addresses (CUDA graphs need no input copies).
        A forward without grad reuses any current cast (it builds no graph, so a backward still pending
        keeps its buffers untouched); a forward with grad reuses only a cast made with grad for the same
        `requires_grad` pattern (freezing or unfreezing experts re-casts, so gradients reach exactly the
        trainable ones). A parameter changed in place between a forward and its backward makes that
        backward fail (the buffers' version check), as it would for any tensor changed after autograd
        saved it. None where there is nothing to cast (data-independent routing, weights already in
        `dtype`, or the eager implementation, which reads the parameters themselves)."""
        token_routed = (self.config.moe_routing in ("token", "context")
                        and experts_implementation(self.config) != "eager")
        linears = self._gated_modules()[1] if token_routed else []
        if all(m.weight.dtype == dtype and m.bias.dtype == dtype for m in linears):  # also: no linears
            self._cast_cache.entry = None
            return None
        # None: cast without grad; else which expert tensors the cast carries gradients to
        tracked = tuple(t.requires_grad for m in linears for t in (m.weight, m.bias)) if torch.is_grad_enabled() else None
        key = (dtype, self._parameter_versions())
        cached = self._cast_cache.entry
        if cached is not None and cached[0] == key and (tracked is None or cached[1] == tracked):
            return cached[2]
        kept = cached[2] if cached is not None else {}
        weights = {m.name: tuple(cast_into(source, _cast_buffer(source, dtype, buffer))
                                 for source, buffer in zip((m.weight, m.bias), kept.get(m.name, (None, None))))
                   for m in linears}
        self._cast_cache.entry = (key, tracked, weights)
        return weights

    def _gated_modules(self) -> tuple[list[tuple[nn.Module, str]], list[UniPerceiverMoELinear]]:
        """([(module, parameter name)] of every gate and expert linear, [the expert linears]), found by a walk
        over the layers (host time the cached inference step of B would otherwise pay per call) that is kept while
        every module on the way is still in place (`module_links`: a replaced or wrapped layer, block, gate,
        router or linear is seen by one identity check per link)."""
        kept, layers = self._merge_slots, self.encoder.layers
        if (kept is None or len(layers) != kept[0]
                or not all(parent._modules.get(name) is child for parent, name, child in kept[1])):
            gated = [(gate, linears) for layer in layers for gate, linears in layer.gated_linears()]
            owners = [owner for gate, linears in gated for owner in (gate, *linears)]
            slots = [(m, name) for owner in owners for m in owner.modules() for name in m._parameters]
            links = module_links(self, owners)  # from the model down to every gate and expert linear
            linked = {(id(parent), name) for parent, name, _ in links}
            links += [(layers, str(i), layer) for i, layer in enumerate(layers)  # dense layers too
                      if (id(layers), str(i)) not in linked]
            self._merge_slots = (len(layers), links, slots, [m for _, linears in gated for m in linears])
        return self._merge_slots[2], self._merge_slots[3]

    def _parameter_versions(self) -> tuple:
        """The optimizer steps taken (`OptimizerSteps`) and the (address, version) of every router and expert
        parameter: the caches' dependency key. Each parameter is read from its module's slot
        (`_gated_modules`), so one replaced is seen too."""
        parameters = (m._parameters[name] for m, name in self._gated_modules()[0])
        return OptimizerSteps.count, tuple((p.data_ptr(), p._version) for p in parameters if p is not None)

    def _routing_state(self, modality_ids, attribute_vectors, task_ids, sequence_mask, dtype,
                       merged_experts: MergedExperts | None = None) -> RoutingState:
        batch, length = sequence_mask.shape
        device = sequence_mask.device
        state = RoutingState(
            token_mask=sequence_mask.reshape(-1),
            sequence_index=torch.arange(batch, device=device).repeat_interleave(length),
            batch_size=batch,
        )
        if self.config.moe_routing == "none":
            return state
        # merged experts come from `merge_for_step`, which gives none while experts are offloaded
        offloaded = merged_experts is None and self.experts_offloaded()
        if not self.config.is_data_independent_routing:
            state.expert_weights = None if offloaded else self.cast_experts(dtype)
            return state
        token_group = None if merged_experts is None else merged_experts.token_group
        if token_group is not None and token_group.numel() == batch:  # per-sequence route inputs
            token_group = token_group.repeat_interleave(length)
        if token_group is not None and token_group.numel() != batch * length:
            token_group = None
        if merged_experts is not None and token_group is not None:  # grouped when the merge's table was read:
            state.groups = RouteGroups.from_token_groups(merged_experts.keys, token_group)  # no per-token keys
            state.merged = merged_experts
        else:
            # ids are range-checked once: by `distinct_route_keys` (no merge given), else here before they
            # are matched against the given table
            keys = self._route_keys(modality_ids, attribute_vectors, task_ids, batch, length,
                                    check_ids=merged_experts is not None)
            keys = keys.reshape(batch * length, *keys.shape[2:])
            if merged_experts is None:  # grouped where the keys are (host keys: no wait for the GPU), used here
                num_ids = {"task": self.config.num_tasks, "modality": self.config.num_modalities}.get(self.config.moe_routing)
                state.groups = RouteGroups.from_keys(keys, num_ids, self.config.moe_routing, device=device)
                state.merged = (MergedExperts(state.groups.keys) if offloaded
                                else self.merged_experts([state.groups.keys], dtype)[0])
            else:  # grouped by the merge's key table: no second torch.unique over the tokens
                state.groups, state.merged_rows = RouteGroups.within_table(to_device(keys, device), merged_experts.keys,
                                                                           "in merged_experts.keys")
                state.merged = merged_experts
        if state.groups.num_groups > 1:
            row_sample = state.sequence_index.index_select(0, state.groups.order)
            state.sorted_rows = SortedRows(state.groups, batch, length, row_sample)
        return state

    @staticmethod
    def _attention_mask(allowed: torch.Tensor | None, dtype) -> torch.Tensor | None:
        """Boolean `[B, L, L]` (True = attend) -> additive `[B, 1, L, L]`."""
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        caption_mode: bool = False,
        attribute_vectors: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        prefix_cache: PrefixCache | None = None,
        merged_experts: MergedExperts | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> UniPerceiverMoEModelOutput | tuple:
        r"""
        input_ids: `[B, T]` CLIP-BPE ids; attention_mask: `[B, T]` 1 for real text tokens.
        pixel_values: `[B, C, H, W]` images or `[B, F, C, H, W]` videos.
        position_ids: `[B, T]` text positions (default 0..T-1).
        caption_mode: append a placeholder q_i per word and use the parallel-teacher-forcing mask
            (the sequence gets T more tokens; the query of word i is at `text_start + T + i`).
        attribute_vectors: `[B, A]` or `[B, L, A]` (attribute routing). task_ids: `[B]` or `[B, L]` (task
            routing). modality_ids: `[B, L]`, derived from the inputs when None (modality routing).
        prefix_cache: a [`PrefixCache`] to record (with `pixel_values` only) or to read (with `input_ids` only
            and `caption_mode`: the text tokens then attend to the cached SPE + image states).
        merged_experts: experts merged beforehand (one entry of `merged_experts([route_key_table(...)], dtype)`)
            for a table of route keys that covers this batch's: the forwards of one step can share one merge.
        inputs_embeds: `[B, T, d]` word embeddings in place of `input_ids` (text positions and the text
            modality embedding are still added by the model).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("give input_ids or inputs_embeds, not both")
        text = input_ids if inputs_embeds is None else inputs_embeds
        text_shape = None if text is None else tuple(text.shape[:2])
        if text is None and pixel_values is None:
            raise ValueError("give input_ids (or inputs_embeds), pixel_values or both")
        if caption_mode and text is None:
            raise ValueError("caption_mode needs input_ids (the words to teacher-force)")
        if text is not None and pixel_values is not None and text.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"batch sizes differ: input_ids {text.shape[0]}, pixel_values {pixel_values.shape[0]}")
        if attention_mask is not None and (text is None or tuple(attention_mask.shape) != text_shape):
            raise ValueError(f"attention_mask must match input_ids {text_shape}, got {tuple(attention_mask.shape)}")
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, T, hidden_size={self.config.hidden_size}], "
                             f"got {tuple(inputs_embeds.shape)}")
        if input_ids is not None and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size})")
        output_attentions, output_hidden_states, output_router_logits, return_dict = self.config_flags(
            output_attentions, output_hidden_states, output_router_logits, return_dict)

        reading_cache = prefix_cache is not None and not prefix_cache.recording
        if reading_cache and (pixel_values is not None or not caption_mode or not prefix_cache.key_values):
            raise ValueError("a filled prefix_cache is read by a caption_mode forward with input_ids only")
        if prefix_cache is not None and prefix_cache.recording and (text is not None or prefix_cache.key_values):
            raise ValueError("recording a prefix_cache needs an empty cache and pixel_values only")
        hidden, derived_modality, text_start = self.embeddings(
            input_ids, pixel_values, position_ids, caption_mode, include_spe=not reading_cache,
            inputs_embeds=inputs_embeds,
        )
        batch, length, _ = hidden.shape
        modality_ids = derived_modality if modality_ids is None else modality_ids
        sequence_mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        if attention_mask is not None:
            text_mask = attention_mask.bool()
            if caption_mode:
                text_mask = torch.cat([text_mask, text_mask], dim=1)
            sequence_mask[:, text_start:] = text_mask
        allowed = None
        if caption_mode:
            allowed = caption_attention_pattern(text_start, text_shape[1], hidden.device).expand(batch, -1, -1)
        if attention_mask is not None:  # applied as given (an all-ones mask changes nothing; testing for one
            # would make the host wait for the GPU)
            key_mask = sequence_mask[:, None, :].expand(batch, length, length)
            allowed = key_mask if allowed is None else allowed & key_mask
        additive_mask = self._attention_mask(allowed, hidden.dtype)
        if self.config.text_distance_bias == "alibi" and text is not None:
            text_positions = (position_ids if position_ids is not None
                              else torch.arange(text_shape[1], device=hidden.device)[None])
            if caption_mode:  # placeholder q_i sits at the position of w_i
                text_positions = torch.cat([text_positions, text_positions], dim=1)
            bias = text_distance_bias(text_positions, self.config.num_attention_heads, length, text_start,
                                      hidden.dtype)
            additive_mask = bias if additive_mask is None else additive_mask + bias

        state = self._routing_state(modality_ids, attribute_vectors, task_ids, sequence_mask, compute_dtype(hidden),
                                    merged_experts)
        state.prefix_cache = prefix_cache
        hidden, all_hidden, all_attn, routing = self.encoder(
            hidden, additive_mask, state, output_attentions, output_hidden_states
        )
        aux_loss = torch.stack([r.aux_loss for r in routing]).sum() if routing else None
        router_logits = router_indices = router_weights = None
        if output_router_logits and self.config.moe_routing != "none":
            decisions = [d for r in routing for d in r.decisions]
            router_logits = tuple(self._per_token(d.logits, state, batch, length) for d in decisions)
            router_indices = tuple(self._per_token(d.expert_index, state, batch, length) for d in decisions)
            router_weights = tuple(self._per_token(d.expert_weight, state, batch, length) for d in decisions)
        output = UniPerceiverMoEModelOutput(
            last_hidden_state=hidden,
            pooler_output=hidden[:, 0],
            sequence_mask=sequence_mask.long(),
            text_start=text_start,
            hidden_states=all_hidden,
            attentions=all_attn,
            router_logits=router_logits,
            router_indices=router_indices,
            router_weights=router_weights,
            aux_loss=aux_loss,
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _per_token(values: torch.Tensor, state: RoutingState, batch: int, length: int) -> torch.Tensor:
        """Gate rows (per group for data-independent routing, else per token) -> `[B, L, ...]`."""
        if state.groups is not None and values.shape[0] == state.groups.num_groups:
            values = values[state.groups.token_group]
        return values.reshape(batch, length, *values.shape[1:])


# =============================================================================================== heads
class UniPerceiverMoEProjectionHead(nn.Module):
    """LayerNorm + Linear (`project`), then L2 normalisation: `[..., d] -> [..., d]` unit vectors."""

    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[..., d]` before the normalisation, in float32."""
        return self.proj(self.norm(hidden)).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(hidden), dim=-1)


def task_family_index(families: list[str], family: str | int) -> int:
    """The row of `family` (a name, or already an index) among `config.task_families`."""
    if isinstance(family, int):
        if not 0 <= family < len(families):
            raise ValueError(f"task family index {family} out of range for {families}")
        return family
    if family not in families:
        raise ValueError(f"unknown task family {family!r}; known: {families}")
    return families.index(family)


class UniPerceiverMoELogitScales(nn.Module):
    """One learnable log-temperature per task family (init ln(1/0.07)); scale = exp(.) clamped at max."""

    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__()
        self.families = list(config.task_families)
        self.max_scale = config.logit_scale_max
        self.log_scale = nn.Parameter(torch.full((len(self.families),), config.logit_scale_init))

    def family_index(self, family: str | int) -> int:
        return task_family_index(self.families, family)

    def forward(self, family: str | int) -> torch.Tensor:
        return self.log_scale[self.family_index(family)].exp().clamp(max=self.max_scale)


class UniPerceiverMoEWordBias(nn.Module):
    """A learned bias `[F, V]` per task family and vocabulary token (`config.word_logit_bias`), zero at init:
    `forward(family, token_ids [C]) -> [C]`, added to the logits of candidates that are single words."""

    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__()
        self.families = list(config.task_families)
        self.bias = nn.Parameter(torch.zeros(len(self.families), config.vocab_size))

    def family_index(self, family: str | int) -> int:
        return task_family_index(self.families, family)

    def forward(self, family: str | int, token_ids: torch.Tensor) -> torch.Tensor:
        return self.bias[self.family_index(family)][token_ids]

    @torch.no_grad()
    def start_from_log_frequencies(self, family: str, token_ids: torch.Tensor, counts: torch.Tensor,
                                   smoothing: float = 0.5) -> None:
        """Set the family's bias of `token_ids` `[K]` to the log-frequencies of `counts` `[K]` (how often each
        is the answer; `smoothing` added to every count), centred on their mean; other tokens keep theirs."""
        if token_ids.shape != counts.shape:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} and counts {tuple(counts.shape)} differ")
        log_frequency = (counts.double() + smoothing).log()
        row = self.bias[self.family_index(family)]
        row[token_ids.to(row.device)] = (log_frequency - log_frequency.mean()).to(row)


class UniPerceiverMoEForGenericPerception(UniPerceiverMoEPreTrainedModel):
    """Every task as one formula: encode inputs and candidate targets with the shared encoder, score
    candidates by scaled cosine, cross-entropy over candidates.

    Queries: the SPE output by default, or `query_positions` `[B, Q]` (indices into the text tokens,
    -1 = no query) e.g. masked words (MLM) or the spe token inside a text (text classification). In
    `caption_mode` the queries default to the T placeholders (the query of word i predicts word i).
    Candidates: `target_*` inputs (encoded here, their SPE outputs) or precomputed `target_features`.

    `check_input_values` (True by default; not part of the config) refuses query positions beyond the text
    and labels beyond the candidates with a `ValueError`. Each check reads a tensor, so on a GPU the host
    waits for the forward pass there; a caller whose inputs are in range by construction (the pre-training
    loop's batch builder) turns it off.
    """

    check_input_values = True

    def __init__(self, config: UniPerceiverMoEConfig):
        super().__init__(config)
        self.uniperceiver = UniPerceiverMoEModel(config)
        self.input_head = UniPerceiverMoEProjectionHead(config)
        # the candidates' head: its own, or the input head (`share_projection_head`, the reference's one head)
        self.target_head = None if config.share_projection_head else UniPerceiverMoEProjectionHead(config)
        self.logit_scales = UniPerceiverMoELogitScales(config)
        self.word_bias = UniPerceiverMoEWordBias(config) if config.word_logit_bias else None
        self.post_init()

    @property
    def candidate_head(self) -> "UniPerceiverMoEProjectionHead":
        """The head that projects candidate (target) features: `target_head`, or `input_head` when shared."""
        return self.input_head if self.target_head is None else self.target_head

    def encode_targets(self, input_ids=None, pixel_values=None, attention_mask=None, attribute_vectors=None,
                       task_ids=None, merged_experts: MergedExperts | None = None, output_attentions: bool = False,
                       output_hidden_states: bool = False, return_outputs: bool = False):
        """Candidate features `[C, d]` (unit vectors) and the router aux loss (and, with `return_outputs`, the
        encoder output of the candidate pass)."""
        out = self.uniperceiver(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                attribute_vectors=attribute_vectors, task_ids=task_ids, merged_experts=merged_experts,
                                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                return_dict=True)
        features = self.candidate_head(out.pooler_output)
        return (features, out.aux_loss, out) if return_outputs else (features, out.aux_loss)

    def encode_candidate_sets(self, shard: CandidateShard, sets: tuple[dict, ...]
                              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every candidate set of `sets` (`target_*` inputs) encoded across the processes: this process encodes
        its slice of each, the slices are gathered at once (one collective, so every process makes the same
        calls in the same order whatever its own task), and each set's features `[C_k, d]` are put back
        together in rank order. Returns them and the router aux loss of this process's slices."""
        slices, sizes, aux = [], [], None
        for rows in sets:
            count = len(rows["target_input_ids"] if rows.get("target_input_ids") is not None
                        else rows["target_pixel_values"])
            part = {key: shard.take(rows.get(f"target_{key}"), count)
                    for key in ("input_ids", "pixel_values", "attention_mask", "attribute_vectors", "task_ids")}
            features, set_aux = self.encode_targets(**part)
            slices.append(features)
            sizes.append((count, features.shape[0]))
            if set_aux is not None:
                aux = set_aux if aux is None else aux + set_aux
        gathered = shard.gather(torch.cat(slices)).reshape(shard.world_size, -1, slices[0].shape[-1])
        out, start = [], 0
        for count, size in sizes:  # [world, size, d] of each set -> [world * size, d] -> the C_k candidates
            out.append(gathered[:, start:start + size].reshape(-1, gathered.shape[-1])[:count])
            start += size
        return out, aux

    @staticmethod
    def gather_queries(out: UniPerceiverMoEModelOutput, query_positions: torch.Tensor | None, caption_mode: bool,
                       num_words: int, check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the queries: (`[B, d]` SPE, or `[B, Q, d]`), and the `[B, Q]` validity mask.
        `check` reads the positions to refuse one beyond the text (`check_input_values`)."""
        hidden = out.last_hidden_state
        if query_positions is None and not caption_mode:
            return hidden[:, 0], None
        if query_positions is None:
            query_positions = torch.arange(num_words, device=hidden.device).expand(hidden.shape[0], -1)
        valid = query_positions >= 0
        offset = out.text_start + (num_words if caption_mode else 0)
        index = (query_positions.clamp(min=0) + offset)
        if check and int(index.max()) >= hidden.shape[1]:
            raise ValueError(f"query_positions reach {int(query_positions.max())}, beyond the text length")
        gathered = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return gathered, valid

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        caption_mode: bool = False,
        attribute_vectors=None,
        task_ids=None,
        query_positions: torch.LongTensor | None = None,
        target_input_ids=None,
        target_pixel_values=None,
        target_attention_mask=None,
        target_attribute_vectors=None,
        target_task_ids=None,
        target_features: torch.Tensor | None = None,
        candidate_token_ids: torch.LongTensor | None = None,
        candidate_shard: CandidateShard | None = None,
        labels: torch.LongTensor | None = None,
        task_family: str | int = 0,
        symmetric_loss: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
    ) -> GenericPerceptionOutput | tuple:
        r"""
        candidate_token_ids: `[C]` the vocabulary token each candidate is, when the candidates are single words
            (MLM, captioning): the task family's word bias of those tokens is added to the logits
            (`config.word_logit_bias`; ignored without it).
        candidate_shard: encode only this process's slice of the candidates and gather every process's
            features (`CandidateShard`): of the `target_*` inputs (every process must pass the same set), or,
            with `sets`, of every set, scoring against set `own` (with `own=None` the `target_*` inputs are
            encoded whole, and the sets only take part for the other processes).
        labels: `[B]` or `[B, Q]` candidate indices (-100 = ignore).
        symmetric_loss: add the target->input direction (retrieval with in-batch candidates, labels = arange).
        With data-independent routing and candidates to encode, the experts are merged once for both
        passes (`UniPerceiverMoEModel.merge_for_step`). output_attentions / output_hidden_states apply to both passes
        (`attentions` / `hidden_states` of the inputs, `target_attentions` / `target_hidden_states`).
        """
        output_attentions, output_hidden_states, output_router_logits, return_dict = self.config_flags(
            output_attentions, output_hidden_states, output_router_logits, return_dict)
        merged_inputs = merged_targets = None
        shared_aux = keep_alive = None
        has_candidates = target_input_ids is not None or target_pixel_values is not None
        if candidate_shard is not None and target_features is None and (candidate_shard.sets or has_candidates):
            sets, own = candidate_shard.sets, candidate_shard.own
            if not sets:  # one set, the same on every process: this call's candidates
                sets, own = ({"target_input_ids": target_input_ids, "target_pixel_values": target_pixel_values,
                              "target_attention_mask": target_attention_mask,
                              "target_attribute_vectors": target_attribute_vectors,
                              "target_task_ids": target_task_ids},), 0
            set_features, shared_aux = self.encode_candidate_sets(candidate_shard, sets)
            if own is not None:
                target_features = set_features[own]
            else:  # this process scores none of the sets: a zero term keeps the gather in its backward pass,
                # whose all-reduce (the other processes' gradients for its slices) every process must join
                keep_alive = sum(features.sum() for features in set_features) * 0.0
        if target_features is None and (target_input_ids is not None or target_pixel_values is not None):
            merged_inputs, merged_targets = self.uniperceiver.merge_for_step(
                attribute_vectors, task_ids, target_attribute_vectors, target_task_ids)
        out = self.uniperceiver(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, caption_mode=caption_mode, attribute_vectors=attribute_vectors,
            task_ids=task_ids, output_router_logits=output_router_logits, merged_experts=merged_inputs,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        num_words = input_ids.shape[1] if input_ids is not None else 0
        queries, valid = self.gather_queries(out, query_positions, caption_mode, num_words, self.check_input_values)
        input_projections = self.input_head.project(queries)
        input_features = F.normalize(input_projections, dim=-1)
        aux_loss = out.aux_loss
        for extra in (shared_aux, keep_alive):
            if extra is not None:
                aux_loss = extra if aux_loss is None else aux_loss + extra
        target_out = None
        if target_features is None:
            if target_input_ids is None and target_pixel_values is None:
                raise ValueError("give candidate targets: target_input_ids / target_pixel_values or target_features")
            target_features, target_aux, target_out = self.encode_targets(
                target_input_ids, target_pixel_values, target_attention_mask, target_attribute_vectors, target_task_ids,
                merged_targets, output_attentions, output_hidden_states, return_outputs=True,
            )
            if target_aux is not None:
                aux_loss = target_aux if aux_loss is None else aux_loss + target_aux
        if target_features.shape[-1] != input_features.shape[-1]:
            raise ValueError(f"target_features width {target_features.shape[-1]} != hidden_size {input_features.shape[-1]}")
        logit_scale = self.logit_scales(task_family)
        logits = logit_scale * input_features @ target_features.float().t()
        if candidate_token_ids is not None and self.word_bias is not None:
            if candidate_token_ids.shape != (target_features.shape[0],):
                raise ValueError(f"candidate_token_ids {tuple(candidate_token_ids.shape)} must be one id per candidate "
                                 f"({target_features.shape[0]})")
            logits = logits + self.word_bias(task_family, candidate_token_ids).float()
        loss = None
        if labels is not None:
            loss = self.candidate_loss(logits, labels, valid, symmetric_loss, task_family)
            if aux_loss is not None:
                loss = loss + aux_loss
        output = GenericPerceptionOutput(
            loss=loss, logits=logits, input_features=input_features, target_features=target_features,
            aux_loss=aux_loss, input_projections=input_projections, input_outputs=out, logit_scale=logit_scale,
            hidden_states=out.hidden_states, attentions=out.attentions,
            target_hidden_states=None if target_out is None else target_out.hidden_states,
            target_attentions=None if target_out is None else target_out.attentions,
        )
        return output if return_dict else output.to_tuple()

    def candidate_loss(self, logits, labels, valid, symmetric: bool, task_family: str | int = 0) -> torch.Tensor:
        """Cross-entropy over candidates, label-smoothed by `config.label_smoothing_for(task_family)`;
        `symmetric` adds both directions (retrieval)."""
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the queries {tuple(logits.shape[:-1])}")
        if valid is not None:
            labels = labels.masked_fill(~valid, -100)
        num_candidates = logits.shape[-1]
        if self.check_input_values and int(labels.max()) >= num_candidates:
            raise ValueError(f"a label is {int(labels.max())} but there are only {num_candidates} candidates")
        smoothing = self.config.label_smoothing_for(task_family)
        if symmetric:
            if logits.dim() != 2 or logits.shape[0] != num_candidates:
                raise ValueError("symmetric_loss needs one query per input and as many candidates as inputs")
            return symmetric_cross_entropy(logits, logits.t(), labels, smoothing)
        return F.cross_entropy(logits.reshape(-1, num_candidates), labels.reshape(-1), label_smoothing=smoothing)


__all__ = [
    "UniPerceiverMoEPreTrainedModel",
    "UniPerceiverMoEModel",
    "UniPerceiverMoEForGenericPerception",
    "UniPerceiverMoELinear",
    "UniPerceiverMoEModelOutput",
    "GenericPerceptionOutput",
    "caption_attention_pattern",
    "symmetric_cross_entropy",
    "sincos_2d_position_embedding",
]
