"""Routing for the conditional-MoE layers: attributes, routers, dispatch plans and auxiliary losses.

Everything that decides *which experts a token uses, with which weights* lives here; the expert
computation itself is `UniPerceiverMoELinear` in `modeling_uniperceiver_moe.py`.

Two families of routing:

* data-independent (`modality`, `task`, `attribute`): the gate sees a per-token *route key* (a
  modality id, a task id or an attribute vector), never the hidden state. All tokens with the same key
  share the same experts and weights, so a layer computes, per distinct key g, ONE merged weight
  `W_g = sum_e gate[g, e] * W_e` and one GEMM over that group's tokens ([`MergedDispatch`]).
  The partition of tokens into groups is identical in every layer, so it is computed once per forward
  pass ([`RouteGroups`]).
* data-dependent (`token`, `context`): the gate sees the token's hidden state (token) or a pooled
  vector of its sequence (context). Token->expert assignments are sorted by expert and run as one
  grouped GEMM, with an expert capacity, a load-balancing loss and a router z-loss ([`TokenDispatch`]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------------------------- attributes
@dataclass(frozen=True)
class TokenAttributes:
    """The 8 binary attributes of a token (reference order; the reading of the bits is inferred).

    Task registries build these per segment (input image, caption text, class-name targets, ...); the
    model only sees the resulting float vectors through `attribute_vectors`.
    """

    input_vision: bool = False  # the task's input contains vision
    input_text: bool = False  # the task's input contains text
    target_vision: bool = False  # the task's targets are visual
    target_text: bool = False  # the task's targets are text
    token_vision: bool = False  # this token is a visual token
    token_text: bool = False  # this token is a text token
    target_side: bool = False  # this token belongs to a target (candidate) sequence
    causal_text: bool = False  # this token is causally masked text (captioning)

    def to_list(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]

    def to_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.to_list(), device=device, dtype=dtype)

    @classmethod
    def from_bits(cls, bits: str) -> "TokenAttributes":
        """`TokenAttributes.from_bits("10011000")`, the reference's notation."""
        if len(bits) != len(fields(cls)) or set(bits) - {"0", "1"}:
            raise ValueError(f"attribute bits must be {len(fields(cls))} characters of 0/1, got {bits!r}")
        return cls(*(b == "1" for b in bits))

    def to_bits(self) -> str:
        return "".join("1" if v else "0" for v in self.to_list())


# --------------------------------------------------------------------------------------------- gates
@dataclass
class GateDecision:
    """Top-k choice of a gate for M rows (groups, tokens or sequences).

    logits: `[M, E]` float32 raw gate logits (before noise).
    expert_index: `[M, k]` long, chosen experts.
    expert_weight: `[M, k]` float32, the chosen experts' softmax weights, renormalised to sum to 1 when
        k > 1; with k = 1 the chosen expert's probability itself (see `select_top_k`).
    """

    logits: torch.Tensor
    expert_index: torch.Tensor
    expert_weight: torch.Tensor

    def dense_weights(self, num_experts: int) -> torch.Tensor:
        """`[M, E]` gate matrix with zeros outside the top-k."""
        dense = self.expert_weight.new_zeros(self.expert_weight.shape[0], num_experts)
        return dense.scatter(1, self.expert_index, self.expert_weight)


def top_k_by_max(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs.topk(top_k, dim=-1)` over a few experts as `top_k` max-reductions, each masking the expert it
    found, which the compiler fuses with the softmax around them (`torch.topk` launches a radix select
    and a bitonic sort per gate; docs/benchmarks.md). Equal values and indices; among exactly equal
    probabilities the lowest expert index comes first."""
    values, indices = [], []
    for _ in range(top_k):
        value, index = probs.max(dim=-1, keepdim=True)
        values.append(value)
        indices.append(index)
        probs = probs.scatter(-1, index, float("-inf"))
    return torch.cat(values, -1), torch.cat(indices, -1)


def select_top_k(logits: torch.Tensor, top_k: int, noise_std: float, training: bool) -> GateDecision:
    """Noisy (training only) softmax gate that keeps the top-k experts.

    With k > 1 the k weights are renormalised to sum to 1 (GShard, the reference's top-2). With k = 1 the
    weight is the chosen expert's probability (Switch Transformer): renormalised it would be exactly 1 and
    the router would get no gradient from the task loss (data-independent routers, which have no
    auxiliary loss, would never learn).
    """
    logits = logits.float()
    noisy = logits + torch.randn_like(logits) * noise_std if training and noise_std > 0 else logits
    probs = noisy.softmax(dim=-1)
    if torch.compiler.is_compiling():  # inside torch.compile: top-k as max-reductions
        weight, index = top_k_by_max(probs, top_k)
    else:
        weight, index = probs.topk(top_k, dim=-1)
    if top_k > 1:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return GateDecision(logits=logits, expert_index=index, expert_weight=weight)


class RouterLinear(nn.Linear):
    """A router's projection, computed in float32 whatever the dtype of its input or weights. The model draws
    it with std `initializer_range` under every initializer scheme, so a new gate is near-uniform over the
    experts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class RouterNorm(nn.LayerNorm):
    """A router's LayerNorm, computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class KeyRouter(nn.Module):
    """Gate of a data-independent routing: the route key embedded into d dimensions (`embed`), LayerNorm,
    Linear(d -> E, no bias), in float32. A gate logit is thus a sum over d learned coordinates.

    Input: unique route keys `[G, ...]`; output: gate logits `[G, E]`.
    """

    def __init__(self, embed: nn.Module, hidden_size: int, num_experts: int, eps: float):
        super().__init__()
        self.embed = embed
        self.norm = RouterNorm(hidden_size, eps=eps)
        self.gate = RouterLinear(hidden_size, num_experts, bias=False)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=keys.device.type, enabled=False):
            return self.gate(self.norm(self.embed(keys).float()))


class AttributeRouter(KeyRouter):
    """Attribute gate of the reference: Linear(A -> d) of the attribute vectors `[G, A]`, then `KeyRouter`'s norm
    and projection."""

    def __init__(self, attribute_dim: int, hidden_size: int, num_experts: int, eps: float):
        super().__init__(RouterLinear(attribute_dim, hidden_size), hidden_size, num_experts, eps)


class IdRouter(KeyRouter):
    """Gate over a small id space (task or modality ids `[G]`, range-checked by the model once per forward):
    Embedding(ids -> d), then `KeyRouter`'s norm and projection, as the attribute gate.

    Not a table of one learned logit per id and expert: drawn near 0, such a logit moves by about one learning
    rate per update of its id, far too little to outgrow the training noise on the logits (std 1 / E) within
    a run, so its experts would be drawn by the noise at every step (docs/results.md, "Why the task and
    modality gates embed their id").
    """

    def __init__(self, num_ids: int, hidden_size: int, num_experts: int, eps: float):
        super().__init__(nn.Embedding(num_ids, hidden_size), hidden_size, num_experts, eps)


def check_id_range(ids: torch.Tensor, limit: int, name: str) -> None:
    """Raise a ValueError naming the route ids that fall outside [0, limit)."""
    outside = (ids < 0) | (ids >= limit)
    if ids.numel() and bool(outside.any()):  # one host read
        raise ValueError(f"{name} ids must lie in [0, {limit}), got {ids[outside].unique().tolist()}")


class HiddenStateRouter(nn.Module):
    """Gate on hidden states (token routing: one per token; context routing: one per pooled sequence).

    Input: `[M, d]`; output: gate logits `[M, E]` in float32.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.gate = RouterLinear(hidden_size, num_experts, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            # a float32 GEMM: as a fused multiply-and-sum reduction inside a compiled graph it measured
            # about twice as slow (docs/benchmarks.md)
            return self.gate(hidden)


class FoldedRouter(nn.Module):
    """Router of a re-parameterised model: route g uses folded expert g with weight 1 (exact lookup).

    Input: group indices into the folded route table `[G]`; output: one-hot logits-free decision.
    """

    def __init__(self, num_routes: int):
        super().__init__()
        self.num_routes = num_routes

    def forward(self, route_index: torch.Tensor) -> GateDecision:
        index = route_index.long().unsqueeze(-1)
        weight = torch.ones(index.shape, dtype=torch.float32, device=index.device)
        logits = torch.zeros(index.shape[0], self.num_routes, device=index.device)
        return GateDecision(logits=logits, expert_index=index, expert_weight=weight)


def build_router(config, role: str) -> nn.Module:
    """The router of one gate decision ("attn" or "ffn") of an MoE layer, chosen by `config.moe_routing`."""
    routing, experts = config.moe_routing, config.moe_num_experts
    if config.folded_routes is not None:
        return FoldedRouter(len(config.folded_routes))
    if routing == "attribute":
        return AttributeRouter(config.attribute_dim, config.hidden_size, experts, config.layer_norm_eps)
    if routing == "task":
        return IdRouter(config.num_tasks, config.hidden_size, experts, config.layer_norm_eps)
    if routing == "modality":
        return IdRouter(config.num_modalities, config.hidden_size, experts, config.layer_norm_eps)
    if routing in ("token", "context"):
        return HiddenStateRouter(config.hidden_size, experts)
    raise ValueError(f"moe_routing={routing!r} has no router")


# --------------------------------------------------------------------------------------------- groups
def one_hot_rows(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """`[M] -> [M, C]` one-hot in `dtype`, without `F.one_hot`'s range check (a host sync on GPU).

    C is `num_classes` rounded up to a multiple of 8; the extra columns are zero. The padding keeps the
    row stride 16-byte aligned, so cuBLAS runs GEMMs with it (and its transpose) on tensor-core kernels
    (with an unaligned width it falls back to a slow non-tensor-core kernel).
    """
    classes = torch.arange(-(-num_classes // 8) * 8, device=index.device)
    return (index[:, None] == classes[None, :]).to(dtype)


def cached_one_hot(cache: dict, index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """`one_hot_rows` kept in `cache` per dtype in eager mode (a batch's layers all reuse it); rebuilt
    inside a compiled graph, where it is one fused comparison and no state may be kept between calls."""
    if torch.compiler.is_compiling():
        return one_hot_rows(index, num_classes, dtype)
    if dtype not in cache:
        cache[dtype] = one_hot_rows(index, num_classes, dtype)
    return cache[dtype]


MAX_COUNTING_SORT_GROUPS = 64  # above this, `stable_group_order` sorts by comparison (memory of the count)


def stable_group_order(group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by group, keeping their order inside a group: the permutation `argsort(group,
    stable=True)` without a comparison sort, for group ids `[M]` long in [0, num_groups).

    A counting sort: a running count over the `[num_groups, M]` group indicator gives each row its rank
    inside its group (int64, 8 bytes per group and row: 2 MiB for B's 16k tokens top-2 over 8 experts),
    and its sorted position is its group's start plus that rank. Beyond `MAX_COUNTING_SORT_GROUPS`
    groups it falls back to `torch.argsort` (whose stable sorts cost more GPU time at these sizes:
    docs/benchmarks.md). No host synchronisation.

    Returns order `[M]` (sorted position -> row), inverse_order `[M]` (row -> sorted position) and the
    rows per group `[num_groups]`, all long.
    """
    rows = torch.arange(group.numel(), device=group.device)
    if num_groups > MAX_COUNTING_SORT_GROUPS:
        order = torch.argsort(group, stable=True)
        counts = torch.zeros(num_groups, dtype=torch.long, device=group.device).scatter_add_(0, group, torch.ones_like(group))
        return order, torch.empty_like(order).scatter_(0, order, rows), counts
    running = (torch.arange(num_groups, device=group.device)[:, None] == group[None, :]).cumsum(1)
    counts = running[:, -1] if group.numel() else torch.zeros(num_groups, dtype=torch.long, device=group.device)
    rank = running.gather(0, group[None, :]).squeeze(0) - 1  # place of each row inside its group
    inverse_order = (torch.cumsum(counts, 0) - counts).index_select(0, group) + rank
    return torch.empty_like(inverse_order).scatter_(0, inverse_order, rows), inverse_order, counts


@dataclass
class RouteGroups:
    """Partition of the N flattened tokens of a batch by route key; shared by every MoE layer.

    keys: `[G, ...]` the distinct route keys (attribute vectors `[G, A]`, or ids `[G]`).
    token_group: `[N]` long, the group of each token.
    order: `[N]` long, token indices sorted by group (stable); inverse_order undoes it.
    sorted_group: `[N]` long, the group of each row in sorted order (non-decreasing).
    offsets: `[G]` int32, cumulative group sizes in `order` (the `offs` of a grouped GEMM).
    """

    keys: torch.Tensor
    token_group: torch.Tensor
    order: torch.Tensor
    inverse_order: torch.Tensor
    sorted_group: torch.Tensor
    offsets: torch.Tensor

    _one_hot: dict = field(default_factory=dict, repr=False)

    @property
    def num_groups(self) -> int:
        return self.keys.shape[0]

    def sorted_one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """`[N, G']` one-hot of each sorted row's group, G' >= G columns (for per-group biases)."""
        return cached_one_hot(self._one_hot, self.sorted_group, self.num_groups, dtype)

    @classmethod
    def from_keys(cls, token_keys: torch.Tensor, num_ids: int | None = None, name: str = "route",
                  device: torch.device | None = None) -> "RouteGroups":
        """token_keys: `[N]` ids (below `num_ids` when given; `name` names them in the range error) or
        `[N, A]` attribute vectors; the groups follow `distinct_route_keys`. The keys are read where they
        are and the groups built on `device` (default: the keys' device; see `to_device`)."""
        keys, token_group = distinct_route_keys(token_keys, num_ids, return_groups=True, name=name)
        device = token_keys.device if device is None else device
        return cls.from_token_groups(to_device(keys, device), to_device(token_group, device))

    @classmethod
    def within_table(cls, token_keys: torch.Tensor, table: torch.Tensor, what: str
                     ) -> tuple["RouteGroups", torch.Tensor | None]:
        """Group tokens by a known table of distinct route keys (e.g. the keys experts were merged for)
        instead of another `torch.unique`: one `[N, K]` comparison and one small host read.

        Returns the groups, whose keys are the table rows the tokens use (in table order), and those rows'
        indices in the table, or None when the tokens use every row. A token key missing from the table
        raises a ValueError (`what` names the table in it).
        """
        match = key_match(token_keys, table)  # [N, K]
        found, used = match.any(-1), match.any(0)
        host = torch.cat([found.all()[None], used]).tolist()
        if not host[0]:
            _raise_missing_keys(token_keys, found, table, what)
        token_row = match.float().argmax(-1)
        if all(host[1:]):
            return cls.from_token_groups(table, token_row), None
        rows = torch.tensor([i for i, u in enumerate(host[1:]) if u], device=table.device)
        renumber = torch.cumsum(used.long(), 0) - 1  # table row -> group among the used rows
        return cls.from_token_groups(table.index_select(0, rows), renumber.index_select(0, token_row)), rows

    @classmethod
    def from_token_groups(cls, keys: torch.Tensor, token_group: torch.Tensor) -> "RouteGroups":
        """keys `[G, ...]`, token_group `[N]` long in [0, G) -> the sorted order, its inverse and offsets.

        With one group (a one-task batch) the rows are already in order: no sort is launched."""
        if keys.shape[0] == 1:
            rows = torch.arange(token_group.numel(), device=token_group.device)
            offsets = torch.full((1,), token_group.numel(), dtype=torch.int32, device=token_group.device)
            return cls(keys, token_group, rows, rows, token_group, offsets)
        order, inverse, counts = stable_group_order(token_group, keys.shape[0])
        sorted_group = token_group.index_select(0, order)
        return cls(keys, token_group, order, inverse, sorted_group, torch.cumsum(counts, 0).to(torch.int32))


MAX_CODED_ATTRIBUTES = 10  # 0/1 attribute vectors up to this width are grouped by integer code


def distinct_route_keys(token_keys: torch.Tensor, num_ids: int | None = None, return_groups: bool = False,
                        name: str = "route"):
    """The distinct route keys of N tokens, ordered as `torch.unique(token_keys, dim=0)` orders them.

    token_keys: `[N]` integer ids or `[N, A]` attribute vectors. Returns keys `[G]` / `[G, A]` (same dtype),
    and with `return_groups` also each token's key index `[N]` long.

    Ids with a known bound `num_ids`, and attribute vectors whose entries are all 0 or 1 (A <=
    `MAX_CODED_ATTRIBUTES`, the first entry most significant), are read as integer codes: a presence
    vector over the codes, one small host read, no sort (`torch.unique(dim=0)` sorts whole rows). Other
    keys go through `torch.unique`. An id outside [0, num_ids) raises a ValueError (`name` names the ids).
    """
    return distinct_route_key_tables([token_keys], num_ids, return_groups, name)[0]


def repeated_slices_cut(values: torch.Tensor, key_dims: int) -> torch.Tensor:
    """`values` with each leading dimension (all but the last `key_dims`) that repeats one slice, a stride-0
    dimension of size > 1 as `expand` makes, cut to size 1: the distinct part of route inputs given as a
    broadcast (e.g. one attribute row for every candidate word), a view, so reading it costs one slice."""
    repeated = [values.stride(d) == 0 and values.shape[d] > 1 for d in range(values.dim() - key_dims)]
    if not any(repeated):
        return values
    return values[tuple(slice(0, 1) if cut else slice(None) for cut in repeated)]


def distinct_route_key_tables(all_token_keys: list[torch.Tensor], num_ids: int | None = None,
                              return_groups: bool = False, name: str = "route") -> list:
    """`distinct_route_keys` of several route inputs (e.g. the inputs and the candidates of a step) with
    one host read for all of them: each read of the GPU waits for everything queued before it."""
    coded = [_route_key_presence(token_keys, num_ids) for token_keys in all_token_keys]
    presences = [found[1] for found in coded if found is not None]
    host = torch.cat(presences).tolist() if presences else []
    tables = []
    for token_keys, found in zip(all_token_keys, coded):
        if found is None:
            tables.append(torch.unique(token_keys, dim=0, return_inverse=return_groups))
            continue
        codes, present = found
        read, host = host[: present.numel()], host[present.numel():]
        tables.append(_table_from_presence(token_keys, codes, present, read, num_ids, return_groups, name))
    return tables


def _route_key_presence(token_keys: torch.Tensor, num_ids: int | None):
    """(codes `[N]` long, presence `[C + 1]` long) of route keys read as integer codes, or None when they
    are not (see `distinct_route_keys`). The last presence slot counts entries that are no valid code.

    Few kernels on purpose (each is a launch on the host's critical path at the start of a step): ids
    outside [0, num_ids) land in the flag slot through a clamp and a remainder; 0/1 vectors are one
    matrix-vector product with the place values, checked by counting the entries where x - x*x != 0."""
    integer = not (token_keys.is_floating_point() or token_keys.is_complex())
    if token_keys.dim() == 1 and integer and num_ids is not None:
        codes = token_keys.long().clamp(-1, num_ids).remainder_(num_ids + 1)  # -1 and num_ids -> num_ids
        num_codes, invalid = num_ids, None
    elif token_keys.dim() == 2 and 0 < token_keys.shape[1] <= MAX_CODED_ATTRIBUTES:
        keys = token_keys.float()
        num_codes = 2 ** keys.shape[1]
        codes = (keys @ _place_values(keys.shape[1], keys.device)).long().clamp_(0, num_codes - 1)
        invalid = torch.count_nonzero(torch.addcmul(keys, keys, keys, value=-1))  # 0 exactly for 0/1 entries
    else:
        return None
    present = torch.zeros(num_codes + 1, dtype=torch.long, device=token_keys.device).index_fill_(0, codes, 1)
    if invalid is not None:  # read with the presence: one transfer
        present[num_codes] = invalid
    return codes, present


_PLACE_VALUES: dict = {}


def _place_values(width: int, device: torch.device) -> torch.Tensor:
    """`[width]` float32 place values of a 0/1 vector read as a binary number, first entry most significant
    (kept per device: built and copied once)."""
    key = (width, str(device))
    if key not in _PLACE_VALUES:
        _PLACE_VALUES[key] = to_device(2.0 ** torch.arange(width - 1, -1, -1), device)
    return _PLACE_VALUES[key]


def _table_from_presence(token_keys, codes, present, host: list[int], num_ids, return_groups: bool, name: str):
    """The table (and groups) of `distinct_route_keys` from the presence read to the host (`host`)."""
    num_codes = len(host) - 1
    if host[num_codes]:
        if token_keys.dim() == 1:  # ids outside [0, num_ids)
            check_id_range(token_keys, num_ids, name)  # raises, naming the ids
        return torch.unique(token_keys, dim=0, return_inverse=return_groups)  # not 0/1 vectors: sort the rows
    used = [code for code, seen in enumerate(host[:num_codes]) if seen]
    if token_keys.dim() != 1:  # codes back to 0/1 vectors, first entry most significant
        width = token_keys.shape[1]
        used = [[(code >> (width - 1 - i)) & 1 for i in range(width)] for code in used]
    keys = torch.tensor(used, dtype=token_keys.dtype).reshape(-1, *token_keys.shape[1:])  # built on the host
    keys._route_key_signature = route_key_signature(keys)  # the merge cache's key without reading the table back
    keys = to_device(keys, token_keys.device)
    if not return_groups:
        return keys
    rank = torch.cumsum(present[:num_codes], 0) - 1  # code -> index among the used codes
    return keys, rank.index_select(0, codes)


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`tensor` on `device`; a host tensor goes to a CUDA device through pinned memory without blocking.

    A plain host-to-device copy makes the host wait for the whole queue of the GPU (PyTorch synchronises
    after a copy from pageable memory): at the start of an inference step that is the previous step's
    tail, which the host would otherwise spend preparing this one. Route tables are small, so pinning
    them costs microseconds. A signature kept by `distinct_route_keys` travels with the table.
    """
    if tensor is None or tensor.device == torch.device(device):
        return tensor
    signature = getattr(tensor, "_route_key_signature", None)
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        moved = tensor.contiguous().pin_memory().to(device, non_blocking=True)  # pinning needs dense memory
    else:
        moved = tensor.to(device)
    if signature is not None:
        moved._route_key_signature = signature
    return moved


def route_key_signature(keys: torch.Tensor) -> bytes:
    """Route keys as bytes: part of a cache key for merged weights. One small device-to-host copy, unless
    `distinct_route_keys` built the keys on the host and kept their signature."""
    known = getattr(keys, "_route_key_signature", None)
    if known is not None:
        return known
    keys = keys.detach().cpu()
    return str(keys.dtype).encode() + str(tuple(keys.shape)).encode() + keys.numpy().tobytes()


def route_rows(keys: torch.Tensor, table: torch.Tensor, what: str) -> torch.Tensor:
    """Row of each key in a route table; a key missing from the table raises a ValueError.

    keys: `[G]` ids or `[G, A]` attribute vectors; table: `[R]` or `[R, A]`. Returns `[G]` long.
    what: how the error names the table (e.g. "folded into this model").
    """
    match = key_match(keys, table)
    found = match.any(-1)
    if not bool(found.all()):
        _raise_missing_keys(keys, found, table, what)
    return match.float().argmax(-1)


def _raise_missing_keys(keys: torch.Tensor, found: torch.Tensor, table: torch.Tensor, what: str):
    """The ValueError for route keys (rows of `keys` where `found` is False) missing from a table."""
    missing = torch.unique(keys.to(table.dtype)[~found], dim=0).tolist()
    raise ValueError(f"route keys {missing} were not {what}; it serves only {table.tolist()}")


def key_match(keys: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`[M, R]` bool: key m equals table row r. keys `[M]` ids or `[M, A]` vectors, table `[R]` or `[R, A]`."""
    keys = keys.to(table.dtype)
    if keys.dim() == 1:
        return keys[:, None] == table[None, :]
    return (keys[:, None, :] == table[None, :, :]).all(-1)


# --------------------------------------------------------------------------------------------- dispatch
def layer_entries(entries: dict | None, layer_idx: int) -> dict | None:
    """The entries of a model-wide table keyed `"{layer}.{name}"` (gates, expert linears) that belong to layer
    `layer_idx`, keyed by `name` alone; None stays None."""
    if entries is None:
        return None
    prefix = f"{layer_idx}."
    return {key[len(prefix):]: value for key, value in entries.items() if key.startswith(prefix)}


@dataclass
class MergedExperts:
    """The merged experts of every data-independent MoE linear of a model for one table of route keys.

    Computed once per training step (or once per route table at inference) and shared by the encoder
    passes that use those keys, e.g. the inputs and the candidate targets of a step: each expert tensor
    is then read once per step by the merge, and its gradient comes back through one merge backward.

    keys: `[K]` ids or `[K, A]` attribute vectors (the route table). decisions: gate name
    (`"{layer}.attn"`, `"{layer}.ffn"`) -> [`GateDecision`] over the K keys. gates: gate name -> `[K, E]`
    float32. weights: linear name (`"{layer}.{projection}"`) -> (weight `[K, out, in]`, bias `[K, out]`)
    in the compute dtype. token_group: see `for_batch` (None in the shared, cached merge).
    """

    keys: torch.Tensor
    decisions: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    token_group: torch.Tensor | None = None

    def for_layer(self, layer_idx: int) -> "MergedExperts":
        """The entries of layer `layer_idx` alone, named within the layer (`"ffn"`, `"ffn_fc1"`; see
        `layer_entries`), with the same keys and token_group. A layer reads its merged experts from this
        view, so its code names no layer index and every MoE layer shares one compiled graph per shape."""
        return replace(self, decisions=layer_entries(self.decisions, layer_idx), gates=layer_entries(self.gates, layer_idx),
                       weights=layer_entries(self.weights, layer_idx))

    def layer_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of a layer view's (`for_layer`) gates and linears, flat, in a fixed order (gate
        decisions and gate matrices by gate name, then weight and bias by linear name). An
        activation-checkpointed layer takes them as explicit inputs (`with_layer_tensors`), so its backward
        stops at them and the merge behind them is differentiated once, by the outer backward."""
        tensors = []
        for name in sorted(self.gates):
            decision = self.decisions[name]
            tensors += [decision.logits, decision.expert_index, decision.expert_weight, self.gates[name]]
        for name in sorted(self.weights):
            tensors += list(self.weights[name])
        return tuple(tensors)

    def with_layer_tensors(self, tensors: tuple[torch.Tensor, ...]) -> "MergedExperts":
        """A shallow copy of a layer view whose entries are `tensors` (in `layer_tensors` order)."""
        rest = iter(tensors)
        decisions, gates, weights = {}, {}, {}
        for name in sorted(self.gates):
            decisions[name] = GateDecision(next(rest), next(rest), next(rest))
            gates[name] = next(rest)
        for name in sorted(self.weights):
            weights[name] = (next(rest), next(rest))
        return replace(self, decisions=decisions, gates=gates, weights=weights)

    def for_batch(self, token_group: torch.Tensor | None) -> "MergedExperts":
        """A shallow copy that also carries `token_group`: the row in `keys` of each route input (`[B]`
        per sequence or `[B*L]` per token) of the batch these keys were read from. The encoder pass of
        that batch then takes its route groups from it, with no key matching and no host read."""
        return replace(self, token_group=token_group)


@dataclass
class MergedDispatch:
    """Data-independent dispatch: per-group gate matrix over experts.

    gates: `[G, E]` float32 (top-k weights, zeros elsewhere) of this pass's G route groups.
    groups: the batch's [`RouteGroups`].
    rows_sorted: the layer already holds its rows in `groups.order` (no permutation per projection).
    merged: precomputed merged weights ([`MergedExperts`]); a linear merges `gates` itself without them.
    merged_rows: `[G]` long, the row of each group in `merged.keys`; None when they are the same table.
    """

    gates: torch.Tensor
    groups: RouteGroups
    decision: GateDecision | None
    rows_sorted: bool = False
    merged: MergedExperts | None = None
    merged_rows: torch.Tensor | None = None

    def merged_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight `[G, out, in]`, bias `[G, out]`) of projection `name` (`merged` is the layer's view,
        `MergedExperts.for_layer`) for this pass's groups, if precomputed."""
        if self.merged is None or name not in self.merged.weights:
            return None
        weight, bias = self.merged.weights[name]
        if self.merged_rows is None:
            return weight, bias
        return weight.index_select(0, self.merged_rows), bias.index_select(0, self.merged_rows)


@dataclass
class TokenDispatch:
    """Data-dependent dispatch: the N*k (token, expert) assignments sorted by expert.

    Assignments are numbered choice-major (slot `c * N + t` = choice c of token t); `order` lists the
    slots sorted by expert and `inverse_order` gives each slot's sorted position, so dispatch and
    combine are gathers (no scatter-add).

    token_index: `[N*k]` long, the token of each sorted assignment (`order % N`).
    expert_index: `[N*k]` long, its expert (non-decreasing).
    weight: `[N*k]` float32, its gate weight; 0 where the assignment was dropped by the capacity.
    offsets: `[E]` int32, cumulative assignments per expert (dropped ones included).
    order / inverse_order: `[N*k]` long, sorted position -> slot and slot -> sorted position.
    experts: the layer's expert linears' parameters (projection name -> (weight, bias)) cast to the compute
        dtype once per parameter update and kept by the model (`UniPerceiverMoEModel.cast_experts`); None:
        each linear casts its own.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor
    decision: GateDecision
    dropped_fraction: torch.Tensor
    order: torch.Tensor
    inverse_order: torch.Tensor
    experts: dict | None = None  # linear name -> (weight `[E, out, in]`, bias `[E, out]`) already in the compute dtype
    _one_hot: dict = field(default_factory=dict, repr=False)

    @property
    def top_k(self) -> int:
        return self.decision.expert_index.shape[1]

    def expert_one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """`[N*k, E']` one-hot of each sorted assignment's expert, E' >= E columns (for expert biases)."""
        return cached_one_hot(self._one_hot, self.expert_index, self.offsets.shape[0], dtype)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float | None) -> int | None:
    """Switch/GShard capacity per expert, `ceil(factor * tokens * k / E)`; None = unlimited."""
    if factor is None:
        return None
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def build_token_dispatch(decision: GateDecision, num_experts: int, capacity: int | None) -> TokenDispatch:
    """Sort the (token, expert) assignments by expert; drop those past an expert's capacity.

    Priority inside an expert: first-choice assignments of all tokens first, then second choices
    (GShard), each in token order (`stable_group_order`). No host synchronisation.
    """
    num_tokens, top_k = decision.expert_index.shape
    # choice-major flattening gives first choices priority over second choices
    flat_expert = decision.expert_index.t().reshape(-1)
    flat_weight = decision.expert_weight.t().reshape(-1)
    order, inverse_order, counts = stable_group_order(flat_expert, num_experts)
    offsets = torch.cumsum(counts, 0)
    sorted_expert = flat_expert.index_select(0, order)
    sorted_weight = flat_weight.index_select(0, order)  # carries the router gradient
    if capacity is not None:
        rank = torch.arange(order.numel(), device=order.device) - (offsets - counts).index_select(0, sorted_expert)
        keep = rank < capacity  # rank of each sorted assignment inside its expert
        sorted_weight = torch.where(keep, sorted_weight, torch.zeros_like(sorted_weight))
        dropped = 1.0 - keep.float().mean() if keep.numel() else flat_weight.new_zeros(())  # 0, not NaN, when empty
    else:
        dropped = flat_weight.new_zeros(())
    return TokenDispatch(
        token_index=order % num_tokens,
        expert_index=sorted_expert,
        weight=sorted_weight,
        offsets=offsets.to(torch.int32),
        decision=decision,
        dropped_fraction=dropped,
        order=order,
        inverse_order=inverse_order,
    )


# --------------------------------------------------------------------------------------------- losses
def load_balancing_loss(decision: GateDecision, num_experts: int, token_mask: torch.Tensor | None = None):
    """Switch/GShard balance loss `E * sum_e f_e * P_e` over real tokens.

    f_e: fraction of top-k assignments that go to expert e; P_e: mean router probability of e.
    Equals 1 for a perfectly uniform router. token_mask: `[M]` bool, rows that count (masked means,
    no boolean indexing: nothing here waits for the device). 0 when no row counts.
    """
    probs = decision.logits.softmax(-1)
    index = decision.expert_index
    assigned = probs.new_zeros(probs.shape).scatter_add_(1, index, probs.new_ones(index.shape))  # [M, E]
    row_weight = _row_weights(token_mask, probs)
    fraction = (assigned * row_weight).sum(0) / index.shape[1]
    return num_experts * (fraction * (probs * row_weight).sum(0)).sum()


def router_z_loss(decision: GateDecision, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the gate logits over the rows that count."""
    z = torch.logsumexp(decision.logits, dim=-1) ** 2
    return (z[:, None] * _row_weights(token_mask, z[:, None])).sum()


def _row_weights(token_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`[M, 1]` weights that turn a sum over rows into the mean over the rows that count."""
    if token_mask is None:
        weights = like.new_ones(like.shape[0], 1)
    else:
        weights = token_mask.to(like.dtype)[:, None]
    return weights / weights.sum().clamp(min=1.0)


__all__ = [
    "TokenAttributes",
    "GateDecision",
    "select_top_k",
    "build_router",
    "RouteGroups",
    "MergedDispatch",
    "MergedExperts",
    "layer_entries",
    "TokenDispatch",
    "build_token_dispatch",
    "stable_group_order",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "route_rows",
    "distinct_route_keys",
    "distinct_route_key_tables",
    "route_key_signature",
    "to_device",
]
