"""Fused Triton kernels for the expert merge `W_g = sum_e gates[g, e] W_e` (CUDA only).

The merge is memory-bound: E float32 expert tensors of P = out * in values each are read to produce G
merged tensors (G = route groups, a handful). As two cuBLAS calls the forward wrote a float32 `[G, P]`
result and cast it to bf16 in a second pass, and the backward cast the bf16 gradient to float32, ran
one GEMM for the expert gradient and a chunked batched GEMM plus a reduction for the gate gradient
(reading the experts a second time). Here:

* forward: one pass over the experts, accumulating in float32 and writing `[G, P]` in the compute dtype;
* backward: one pass that reads the gradient `[G, P]` and the experts once and writes the expert
  gradient `[E, P]` (float32) and per-block partial gate gradients `[blocks, G, E]`, summed afterwards.

`merge_forward` / `merge_backward` return None where the kernels do not apply (no Triton, not CUDA, not
float32 experts, or offsets beyond int32), and the caller falls back to the GEMM path. Both are registered with
`torch.library.triton_op`, so `torch.compile` sees them as operators.
"""

from __future__ import annotations

import contextlib

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ENABLED = True  # `disabled()` switches it off (benchmarks and tests compare with the GEMM path)


@contextlib.contextmanager
def disabled():
    """Inside this block the merge takes the GEMM path even where the kernels apply."""
    global ENABLED
    previous, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = previous


def available(experts: torch.Tensor, num_groups: int) -> bool:
    """The kernels apply: Triton present, float32 experts `[E, P]` on CUDA, offsets that fit in int32."""
    fits = max(experts.shape[0], num_groups) * experts.shape[1] < 2**31
    return ENABLED and triton is not None and experts.is_cuda and experts.dtype == torch.float32 and fits


def _padded(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _block(num_groups: int) -> int:
    """Columns per program: ~4k float32 accumulators per program whatever the number of groups."""
    return min(1024, max(64, 4096 // _padded(num_groups)))


if triton is not None:

    @triton.jit
    def _merge_forward_kernel(gates, experts, out, P, G: tl.constexpr, E: tl.constexpr, G_PAD: tl.constexpr,
                              BLOCK_P: tl.constexpr):
        column = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        inside = column < P
        row = tl.arange(0, G_PAD)
        real_row = row < G
        acc = tl.zeros([G_PAD, BLOCK_P], dtype=tl.float32)
        for e in tl.static_range(E):
            weight = tl.load(experts + e * P + column, mask=inside, other=0.0)
            gate = tl.load(gates + row * E + e, mask=real_row, other=0.0)
            acc += gate[:, None] * weight[None, :]
        tl.store(out + row[:, None] * P + column[None, :], acc.to(out.dtype.element_ty),
                 mask=real_row[:, None] & inside[None, :])

    @triton.jit
    def _merge_backward_kernel(grad, gates, experts, grad_experts, partial_gates, P, G: tl.constexpr,
                               E: tl.constexpr, G_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
        block = tl.program_id(0)
        column = block * BLOCK_P + tl.arange(0, BLOCK_P)
        inside = column < P
        row = tl.arange(0, G_PAD)
        real_row = row < G
        g = tl.load(grad + row[:, None] * P + column[None, :], mask=real_row[:, None] & inside[None, :],
                    other=0.0).to(tl.float32)
        for e in tl.static_range(E):
            gate = tl.load(gates + row * E + e, mask=real_row, other=0.0)
            tl.store(grad_experts + e * P + column, tl.sum(gate[:, None] * g, axis=0), mask=inside)
            weight = tl.load(experts + e * P + column, mask=inside, other=0.0)
            tl.store(partial_gates + (block * G_PAD + row) * E + e, tl.sum(g * weight[None, :], axis=1))

    def _merge_forward_op(gates: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        num_groups, num_experts = gates.shape
        length = experts.shape[1]
        out = torch.empty(num_groups, length, device=experts.device, dtype=dtype)
        block = _block(num_groups)
        wrap_triton(_merge_forward_kernel)[(triton.cdiv(length, block),)](
            gates, experts, out, length, num_groups, num_experts, _padded(num_groups), block)
        return out

    def _merge_backward_op(grad: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        num_groups, num_experts = gates.shape
        length = experts.shape[1]
        block = _block(num_groups)
        blocks = triton.cdiv(length, block)
        grad_experts = torch.empty_like(experts)
        partial = torch.empty(blocks, _padded(num_groups), num_experts, device=experts.device, dtype=torch.float32)
        wrap_triton(_merge_backward_kernel)[(blocks,)](grad, gates, experts, grad_experts, partial, length,
                                                        num_groups, num_experts, _padded(num_groups), block)
        return partial.sum(0)[:num_groups], grad_experts

    for _name, _fn in (("merge_forward", _merge_forward_op), ("merge_backward", _merge_backward_op)):
        try:
            triton_op(f"uniperceiver_moe::{_name}", mutates_args=())(_fn)
        except RuntimeError:  # already registered (the module imported a second time under another name)
            pass


def merge_forward(gates: torch.Tensor, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """gates `[G, E]` float32, experts `[E, P]` float32 contiguous -> `[G, P]` in `dtype`, or None."""
    if not available(experts, gates.shape[0]):
        return None
    return torch.ops.uniperceiver_moe.merge_forward(gates.contiguous(), experts.contiguous(), dtype)


def merge_backward(grad: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """grad `[G, P]` (any float dtype) -> (gate gradient `[G, E]`, expert gradient `[E, P]`), float32, or None."""
    if not available(experts, gates.shape[0]):
        return None
    return torch.ops.uniperceiver_moe.merge_backward(grad.contiguous(), gates.contiguous(), experts.contiguous())
