"""Re-parameterisation: fold a data-independent MoE model into a dense model for a fixed set of routes.

With modality / task / attribute routing every token with route key r uses the merged linear
`W_r = sum_e gate_r[e] W_e` (gates computed without noise). `fold_experts` computes W_r once for each
requested route and returns a model of the same class whose expert linears hold exactly those merged
weights (one "expert" per route, selected by an exact key lookup, no gates). With one route, each
such linear is a plain dense linear. The folded model saves with `save_pretrained` and reloads with
`AutoModel.from_pretrained`; it raises a ValueError for route keys it was not folded for.
"""

from __future__ import annotations

import copy

import torch

from .modeling_uniperceiver_moe import UniPerceiverMoELayer, UniPerceiverMoELinear
from .routing import select_top_k

_BLOCK_PROJECTIONS = {"attn_gate": ("attention.qkv", "attention.out_proj"), "ffn_gate": ("mlp.fc1", "mlp.fc2")}


def _route_table(config, routes) -> torch.Tensor:
    if config.moe_routing == "attribute":
        table = torch.as_tensor(routes, dtype=torch.float32)
        if table.dim() == 1:
            table = table[None]
        if table.dim() != 2 or table.shape[1] != config.attribute_dim:
            raise ValueError(f"attribute routes must be [R, attribute_dim={config.attribute_dim}], got {tuple(table.shape)}")
    else:
        table = torch.as_tensor(routes, dtype=torch.long).reshape(-1)
        limit = config.num_tasks if config.moe_routing == "task" else config.num_modalities
        if table.min() < 0 or table.max() >= limit:
            raise ValueError(f"{config.moe_routing} routes must lie in [0, {limit}), got {table.tolist()}")
    if torch.unique(table, dim=0).shape[0] != table.shape[0]:
        raise ValueError(f"routes must be distinct, got {table.tolist()}")
    return table


@torch.no_grad()
def fold_experts(model, routes):
    """Return a folded copy of `model` (`UniPerceiverMoEModel` or a head class) serving `routes`.

    routes: attribute vectors `[R, A]` (attribute routing) or ids `[R]` (task / modality routing).
    """
    config = model.config
    if not config.is_data_independent_routing:
        raise ValueError(f"only modality/task/attribute routing can be folded, this model uses {config.moe_routing!r}")
    if config.folded_routes is not None:
        raise ValueError("this model is already folded")
    table = _route_table(config, routes)
    folded_config = copy.deepcopy(config)
    folded_config.folded_routes = table.tolist()
    folded = model.__class__(folded_config).to(next(model.parameters()).dtype)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, UniPerceiverMoELayer):
            for gate_name, projections in _BLOCK_PROJECTIONS.items():
                gate = getattr(module, gate_name)
                if gate is None:
                    continue
                logits = gate.router(table.to(next(gate.parameters()).device))
                gates = select_top_k(logits, config.moe_top_k, 0.0, training=False).dense_weights(config.moe_num_experts)
                for projection in projections:
                    linear = module.get_submodule(projection)
                    if isinstance(linear, UniPerceiverMoELinear):
                        weight, bias = linear.merged_parameters(gates)
                        state[f"{name}.{projection}.weight"] = weight
                        state[f"{name}.{projection}.bias"] = bias
    for key, value in model.state_dict().items():
        if ".router." not in key:
            state.setdefault(key, value)
    folded.load_state_dict(state, strict=True)
    folded.eval()
    return folded
