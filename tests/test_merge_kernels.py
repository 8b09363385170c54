"""The fused CUDA merge kernels equal the GEMM path they replace (skipped without a CUDA device and Triton)."""

import contextlib

import pytest
import torch

from modeling_uniperceiver_moe import merge_kernels
from modeling_uniperceiver_moe.moe_implementations import _MergeExperts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or merge_kernels.triton is None,
                                reason="needs a CUDA device and Triton")


def _merge(gates, experts, dtype, fused: bool):
    with contextlib.nullcontext() if fused else merge_kernels.disabled():
        out = _MergeExperts.apply(gates, experts, dtype)
        grad_out = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
        grad_gates, grad_experts = torch.autograd.grad(out, (gates, experts), grad_out)
        return out, grad_gates, grad_experts


@pytest.mark.parametrize("groups, experts, length, dtype", [(4, 8, 768 * 3072, torch.bfloat16), (3, 8, 1000, torch.float32),
                                                            (1, 4, 4096, torch.bfloat16), (9, 16, 5000, torch.float32)])
def test_fused_merge_equals_gemm_path(groups, experts, length, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    gates = torch.rand(groups, experts, device="cuda", generator=g).requires_grad_()
    weights = (torch.randn(experts, length, device="cuda", generator=g) * 0.02).requires_grad_()
    with torch.no_grad():  # the fused path really runs here (else this would compare the GEMM path with itself)
        assert merge_kernels.merge_forward(gates, weights, dtype) is not None
    fused = _merge(gates, weights, dtype, True)
    plain = _merge(gates, weights, dtype, False)
    assert fused[0].dtype == dtype
    # float32 sums in a different order: equal to rounding of the output dtype
    torch.testing.assert_close(fused[0].float(), plain[0].float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-5, atol=1e-6)


def test_fused_merge_compiles_into_one_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    gates = torch.rand(3, 8, device="cuda", generator=g).requires_grad_()
    weights = torch.randn(8, 4096, device="cuda", generator=g).requires_grad_()

    def step(gates, weights):
        return _MergeExperts.apply(gates, weights, torch.bfloat16).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_grads = torch.autograd.grad(step(gates, weights), (gates, weights))
    compiled_grads = torch.autograd.grad(compiled(gates, weights), (gates, weights))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
