"""Exactness of the speed paths of the MoE layers: sorted layers, inference merge cache, no host syncs."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_moe import unsorted_layers
from modeling_uniperceiver_moe import UniPerceiverMoEModel
from modeling_uniperceiver_moe.modeling_uniperceiver_moe import UniPerceiverMoELinear
from tests.conftest import make_batch, tiny_config


def _attribute_batch():
    """A batch whose tokens fall into several route groups (image tokens, text tokens, two sequence kinds)."""
    batch = make_batch()
    length = 1 + 4 + batch["input_ids"].shape[1]  # SPE + 2x2 patches (tiny config) + words
    attributes = torch.zeros(3, length, 8)
    attributes[:, :5, 0] = 1
    attributes[:, 5:, 1] = 1
    attributes[0] = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 0])
    batch["attribute_vectors"] = attributes
    return batch


@pytest.mark.parametrize("routing", ["attribute", "modality"])
def test_sorted_layers_equal_per_projection_permutation(routing):
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config(routing, drop_path_rate=0.0)).train()
    batch = _attribute_batch()
    torch.manual_seed(1)  # same router noise in both forwards
    sorted_out = model(**batch).last_hidden_state
    assert sorted_out.shape[1] == batch["attribute_vectors"].shape[1], "test batch layout drifted from the config"
    sorted_grads = torch.autograd.grad(sorted_out.square().sum(), list(model.parameters()), allow_unused=True)
    with unsorted_layers():
        torch.manual_seed(1)
        plain_out = model(**batch).last_hidden_state
        plain_grads = torch.autograd.grad(plain_out.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(sorted_out, plain_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(sorted_grads, plain_grads):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inference_reuses_merged_weights_until_a_parameter_changes(monkeypatch):
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config("attribute")).eval()
    batch = _attribute_batch()
    calls = collections.Counter()
    original = UniPerceiverMoELinear.merged_parameters

    def counting(self, *args, **kwargs):
        calls["merge"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UniPerceiverMoELinear, "merged_parameters", counting)
    with torch.no_grad():
        first = model(**batch).last_hidden_state
        merges = calls["merge"]
        second = model(**batch).last_hidden_state
        assert merges > 0 and calls["merge"] == merges  # the second forward merged nothing
        assert torch.equal(first, second)
        expert = next(m for m in model.modules() if isinstance(m, UniPerceiverMoELinear))
        expert.weight.add_(torch.randn_like(expert.weight))  # in-place updates (optimizer, load) bump the version
        updated = model(**batch).last_hidden_state
        assert calls["merge"] > merges
    fresh = model(**batch).last_hidden_state  # with grad enabled nothing is cached: merged from scratch
    torch.testing.assert_close(updated, fresh.detach())
    assert expert._merged_cache is None  # a forward with grad frees what inference cached
    assert not torch.equal(updated, first)


class _CountHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_reads(routing: str) -> int:
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config(routing, num_hidden_layers=4)).train()
    batch = _attribute_batch()
    model(**batch).last_hidden_state.sum().backward()  # warm-up outside the count
    counter = _CountHostReads()
    with counter:
        model(**batch).last_hidden_state.sum().backward()
    return counter.count


def test_expert_layers_add_no_host_synchronisation():
    """Input validation reads a few values back (ids in range); the expert layers themselves add none.
    (Modality/task routing also range-check their ids once per forward, so they are not compared.)"""
    dense = _host_reads("none")
    for routing in ("token", "context", "attribute"):
        assert _host_reads(routing) == dense, routing


@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_compiled_encoder_is_one_graph_and_matches_eager(routing):
    """`compile_encoder` traces the whole layer stack without a graph break (fullgraph=True raises on one),
    including sorted rows, drop path and the grouped GEMM, and computes what eager computes (outputs and
    gradients, the latter to bf16 rounding). bf16 autocast: the CPU grouped GEMM is traced in bf16 only.
    torch 2.11 broke the graph at a dict cache on a routing dataclass that torch 2.13 traces, so on the CPU
    stack this guards the structure, not every version's tracer (the GPU benchmark prints graph breaks)."""
    torch._dynamo.reset()
    config = tiny_config(routing, drop_path_rate=0.2, num_hidden_layers=3)
    batch = _attribute_batch()

    def run(compiled):
        torch.manual_seed(0)
        model = UniPerceiverMoEModel(config).train()
        if compiled:
            model.compile_encoder(fullgraph=True, dynamic=False, backend="aot_eager")
        torch.manual_seed(1)  # same drop-path draws and router noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch).last_hidden_state
        grads = torch.autograd.grad(out.float().square().sum(), list(model.parameters()), allow_unused=True)
        return out, grads

    (eager_out, eager_grads), (compiled_out, compiled_grads) = run(False), run(True)
    torch.testing.assert_close(compiled_out, eager_out)
    assert sum(g is not None for g in eager_grads) > 10
    for a, b in zip(compiled_grads, eager_grads):
        assert (a is None) == (b is None)
        if a is not None:  # bf16 backward: the traced graph may round in another order
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * b.abs().max().item() + 1e-6)
    torch._dynamo.reset()


def test_drop_path_scales_follow_the_linear_schedule():
    from modeling_uniperceiver_moe.modeling_uniperceiver_moe import drop_path_scales

    assert drop_path_scales(0.3, 4, 8, "cpu", training=False) is None
    assert drop_path_scales(0.0, 4, 8, "cpu", training=True) is None
    torch.manual_seed(0)
    scales = drop_path_scales(0.3, 4, 20000, "cpu", training=True)  # [layers, 2 branches, batch]
    assert scales.shape == (4, 2, 20000)
    assert torch.equal(scales[0], torch.ones(2, 20000))  # first layer: rate 0
    for layer, rate in enumerate([0.0, 0.1, 0.2, 0.3]):
        kept = scales[layer] > 0
        assert torch.allclose(scales[layer][kept], torch.tensor(1 / (1 - rate)))
        assert abs((~kept).float().mean().item() - rate) < 0.01
