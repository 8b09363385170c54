"""The fast implementation of the expert linears, selected by `config.experts_implementation="grouped_mm"`
(the default), beside the plain `"eager"` one in `modeling_uniperceiver_moe.py` (as transformers selects its
experts implementations). Both compute the same function; tests/test_modeling.py checks outputs and gradients
of every routing against eager.

`UniPerceiverMoELinear` calls one entry point per dispatch kind:

* `merged_forward(linear, x, dispatch)`: data-independent routing (modality, task, attribute, folded): the
  rows sorted by route group and one grouped GEMM over the merged weights `W_g` (a plain GEMM for one group).
* `token_forward(linear, x, dispatch)` / `expert_rows(linear, x_sorted, dispatch)`: token and context
  routing: the (token, expert) assignments in expert order through one grouped GEMM, dispatch and combine
  by gathers (no scatter-add), no Python loop over experts.
* `merge_experts(gates, experts, dtype)`: `W_g = sum_e gates[g, e] W_e`, one fused Triton kernel per
  direction on CUDA (`merge_kernels`), a float32 GEMM elsewhere.
* `cast_into(source, buffer)`: the differentiable cast of experts into kept buffers that the model shares
  across the passes of a step (`UniPerceiverMoEModel.cast_experts`).

The autograd Functions here exist for speed: each replaces an op whose default backward is a scatter or a
badly shaped GEMM.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn import functional as F

from .merge_kernels import merge_backward, merge_forward
from .routing import MergedDispatch, TokenDispatch


# --------------------------------------------------------------------------------------------- entry points
def merged_forward(linear, x: torch.Tensor, dispatch: MergedDispatch) -> torch.Tensor:
    """Data-independent routing: x `[N, in]` -> `[N, out]`, each row through its route group's merged
    weight. Uses the step's precomputed merge (`dispatch.merged`) when there is one; rows are permuted into
    group order here unless the layer already keeps them so (`dispatch.rows_sorted`)."""
    dtype = compute_dtype(x)
    merged = dispatch.merged_parameters(linear.projection)
    weight, bias = linear.merged_parameters(dispatch.gates, dtype) if merged is None else merged
    weight, bias = weight.to(dtype), bias.to(dtype)
    groups = dispatch.groups
    if groups.num_groups == 1:
        return F.linear(x.to(dtype), weight.squeeze(0), bias.squeeze(0))
    x_sorted = x if dispatch.rows_sorted else permute_rows(x, groups.order, groups.inverse_order)
    out_sorted = grouped_linear(x_sorted, weight, groups.offsets, bias, groups.sorted_group, groups.sorted_one_hot(dtype))
    return out_sorted if dispatch.rows_sorted else permute_rows(out_sorted, groups.inverse_order, groups.order)


def token_forward(linear, x: torch.Tensor, dispatch: TokenDispatch) -> torch.Tensor:
    """Token/context routing: x `[N, in]` -> `[N, out]`, the gate-weighted sum of each token's experts."""
    return combine_assignments(expert_rows(linear, dispatch_assignments(x, dispatch), dispatch), dispatch)


def expert_rows(linear, x_sorted: torch.Tensor, dispatch: TokenDispatch) -> torch.Tensor:
    """Token routing on rows already in expert order: x_sorted `[N*k, in]` (`dispatch_assignments`)
    -> `[N*k, out]`, each row through its expert in one grouped GEMM and scaled by its gate weight."""
    dtype = compute_dtype(x_sorted)
    cast = dispatch.experts.get(linear.projection) if dispatch.experts is not None else None
    weight, bias = (linear.weight, linear.bias) if cast is None else cast
    out_sorted = grouped_linear(x_sorted, weight, dispatch.offsets, bias, dispatch.expert_index,
                                dispatch.expert_one_hot(dtype))
    return out_sorted * dispatch.weight.to(out_sorted.dtype)[:, None]


def merge_experts(gates: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gates `[G, E]` float32, experts `[E, P]` float32 -> `[G, P]` in `dtype` (see `_MergeExperts`)."""
    return _MergeExperts.apply(gates, experts, dtype)


def cast_into(source: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """`source` written into `buffer` in `buffer`'s dtype, differentiably (see `_CastInto`)."""
    return _CastInto.apply(source, buffer)


# --------------------------------------------------------------------------------------------- helpers
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype inside autocast, else `x.dtype`."""
    return matmul_dtype(x.device, x.dtype)


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of `dtype` tensors on `device` runs in: the autocast dtype inside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def grouped_linear(
    x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None, row_one_hot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of `x_sorted` `[M, in]` come in contiguous groups; group g uses `weight[g]` `[out, in]`.

    offsets: `[G]` int32 cumulative group ends. bias: `[G, out]`, with `row_group` `[M]` (each row's
    group) and `row_one_hot` `[M, G']` (its one-hot, G' >= G zero-padded columns); see `_AddRowBias`.
    Runs in the dtype of `compute_dtype(x_sorted)`:
    one grouped GEMM (`torch.nn.functional.grouped_mm`) where the kernel exists for this device/dtype,
    otherwise one GEMM per group. Returns `[M, out]`.
    """
    dtype = compute_dtype(x_sorted)
    x_sorted, weight = x_sorted.to(dtype), weight.to(dtype)
    if _grouped_mm_supported(x_sorted, weight.shape[1]):
        out = F.grouped_mm(x_sorted, weight.transpose(1, 2), offs=offsets)
        out = _ContiguousGrad.apply(out)
    else:
        ends = offsets.tolist()
        starts = [0] + ends[:-1]
        out = torch.cat([x_sorted[s:e] @ weight[g].t() for g, (s, e) in enumerate(zip(starts, ends))])
    if bias is not None:
        out = _AddRowBias.apply(out, bias.to(dtype), row_group, row_one_hot.to(dtype))
    return out


class _AddRowBias(torch.autograd.Function):
    """`out + bias[row_group]` for rows `[M, out]` and a per-group bias `[G, out]`.

    Forward: one addmm with the rows' zero-padded one-hot `[M, G']` and the bias padded to G' rows in
    eager mode (K = G' keeps the operands aligned; with the one-hot sliced to K = G cuBLAS picks a
    slow non-tensor-core kernel); a
    gather-add inside a compiled graph, where the compiler fuses it into the next elementwise op (the
    activation, the residual add). Backward: the bias gradient is one GEMM with the transposed one-hot
    (no scatter-add; with the padding the compiled step's profile shows no sm75 kernel).
    """

    @staticmethod
    def forward(ctx, out, bias, row_group, row_one_hot):
        ctx.save_for_backward(row_one_hot)
        ctx.num_groups = bias.shape[0]
        if torch.compiler.is_compiling():
            return out + bias.index_select(0, row_group)
        return torch.addmm(out, row_one_hot, F.pad(bias, (0, 0, 0, row_one_hot.shape[1] - bias.shape[0])))

    @staticmethod
    def backward(ctx, grad):
        (row_one_hot,) = ctx.saved_tensors
        return grad, (row_one_hot.t() @ grad)[: ctx.num_groups], None, None


class _MergeExperts(torch.autograd.Function):
    """`W_g = sum_e gates[g, e] W_e` for G route groups, returned in the compute dtype.

    gates `[G, E]` float32, experts `[E, P]` float32 (P = out * in) -> `[G, P]` in `dtype`. On CUDA both
    directions are one fused Triton kernel each (`merge_kernels`: one read of the experts per direction,
    the result written in `dtype` directly). Elsewhere: a float32 GEMM and a cast; the gate gradient, a
    reduction over P (millions), runs as a batched GEMM over P-chunks (as one GEMM with K = P cuBLAS
    picks a small-tile kernel that leaves most of the GPU idle).
    """

    @staticmethod
    def forward(ctx, gates, experts, dtype):
        ctx.save_for_backward(gates, experts)
        fused = merge_forward(gates, experts, dtype)
        return (gates @ experts).to(dtype) if fused is None else fused

    @staticmethod
    def backward(ctx, grad):
        gates, experts = ctx.saved_tensors
        fused = merge_backward(grad, gates, experts)
        if fused is not None:
            grad_gates, grad_experts = fused
            return (grad_gates if ctx.needs_input_grad[0] else None,
                    grad_experts if ctx.needs_input_grad[1] else None, None)
        grad = grad.to(experts.dtype).contiguous()
        grad_experts = gates.t() @ grad if ctx.needs_input_grad[1] else None
        grad_gates = _chunked_row_products(grad, experts) if ctx.needs_input_grad[0] else None
        return grad_gates, grad_experts, None


class _CastInto(torch.autograd.Function):
    """`source` cast to `buffer`'s dtype, written into `buffer` (a tensor kept between calls, so its address
    stays fixed) and returned as `buffer`; the gradient goes back to `source` in `source`'s dtype.

    Used by `UniPerceiverMoEModel.cast_experts` (`cast_into`): every forward of a training step shares one cast of the
    float32 experts, and autograd sums the compute-dtype gradients of all their uses before the one
    cast back (as autocast's weight-cast cache does for dense weights in eager mode).
    """

    @staticmethod
    def forward(ctx, source, buffer):
        ctx.source_dtype = source.dtype
        buffer.copy_(source)
        ctx.mark_dirty(buffer)
        return buffer

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.source_dtype), None


def _chunked_row_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b.T` for short, very long rows: a `[G, P]`, b `[E, P]` -> `[G, E]`, as a bmm over P-chunks."""
    length = a.shape[1]
    chunks = next((c for c in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2) if length % c == 0 and length // c >= 64), 1)
    if chunks == 1:
        return a @ b.t()
    width = length // chunks
    per_chunk = torch.bmm(a.view(a.shape[0], chunks, width).transpose(0, 1), b.view(b.shape[0], chunks, width).permute(1, 2, 0))
    return per_chunk.sum(0)


class _PermuteRows(torch.autograd.Function):
    """`x[order]` for a permutation `order`, whose backward is the inverse gather.

    Plain advanced indexing back-propagates through a deterministic index_put (a sort and a scatter, the
    largest part of a B-size training step when it was measured); a permutation needs only a gather.
    """

    @staticmethod
    def forward(ctx, x, order, inverse_order):
        ctx.save_for_backward(inverse_order)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse_order,) = ctx.saved_tensors
        return grad.index_select(0, inverse_order), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse_order: torch.Tensor) -> torch.Tensor:
    """Rows of `x` `[N, ...]` in the order `order` (a permutation of 0..N-1)."""
    return _PermuteRows.apply(x, order, inverse_order)


class _DispatchTokens(torch.autograd.Function):
    """`x[token_index]` for token-routed assignments (each token appears k times), backward by gathers.

    The sorted assignments are a permutation of the k*N choice-major slots, so the gradient of token t
    is the sum of its k slots: gather by `inverse_order`, view `[k, N, d]`, sum. No scatter-add.
    """

    @staticmethod
    def forward(ctx, x, token_index, inverse_order, top_k):
        ctx.save_for_backward(inverse_order)
        ctx.top_k = top_k
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        (inverse_order,) = ctx.saved_tensors
        per_slot = grad.index_select(0, inverse_order)
        return per_slot.view(ctx.top_k, -1, grad.shape[-1]).sum(0), None, None, None


def dispatch_assignments(x: torch.Tensor, dispatch: TokenDispatch) -> torch.Tensor:
    """Token routing: rows `[N, d]` -> their N*k assignments in expert order `[N*k, d]`, in the compute dtype."""
    return _DispatchTokens.apply(x.to(compute_dtype(x)), dispatch.token_index, dispatch.inverse_order, dispatch.top_k)


def combine_assignments(out_sorted: torch.Tensor, dispatch: TokenDispatch) -> torch.Tensor:
    """Token routing: gate-weighted expert outputs `[N*k, d]` in expert order -> `[N, d]`, each token's k
    assignments summed (with top-1 only the permutation back)."""
    per_slot = permute_rows(out_sorted, dispatch.inverse_order, dispatch.order)
    if dispatch.top_k == 1:
        return per_slot
    return per_slot.view(dispatch.top_k, -1, out_sorted.shape[-1]).sum(0)


def _grouped_mm_supported(x: torch.Tensor, out_features: int) -> bool:
    """grouped_mm runs on CPU, and on CUDA for bf16 on Hopper or newer, for rows (`[M, in]` inputs, `[M, out]`
    outputs and their gradients) whose byte strides are multiples of 16."""
    if not hasattr(F, "grouped_mm"):
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (out_features * x.element_size()) % 16:
        return False  # e.g. intermediate_size 37 in float32, hidden_size 36 in bfloat16
    if x.device.type == "cpu":  # eager CPU has float32 kernels; the compiler's shape function wants bf16
        return x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and _cuda_major(x.device.index) >= 9


@lru_cache(maxsize=None)
def _cuda_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()
