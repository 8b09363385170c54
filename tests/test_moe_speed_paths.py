"""Exactness of the speed paths of the MoE layers: sorted layers, inference merge cache, no host syncs."""

import collections
import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_moe import per_pass_casts, unsorted_layers
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception, UniPerceiverMoEModel
from modeling_uniperceiver_moe import modeling_uniperceiver_moe as modeling
from modeling_uniperceiver_moe import moe_implementations
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


@pytest.mark.parametrize("routing,capacity", [("token", None), ("token", 0.5), ("context", None)])
def test_top1_mlp_in_expert_order_equals_per_projection_dispatch(routing, capacity, monkeypatch):
    """Top-1 token routing keeps the MLP's hidden rows in expert order (two row permutations fewer): same
    outputs and gradients, bit for bit, as combining fc1's rows and dispatching them again; also with
    assignments dropped by a capacity."""
    torch.manual_seed(0)
    config = tiny_config(routing, moe_top_k=1, drop_path_rate=0.0, moe_capacity_factor=capacity)
    model = UniPerceiverMoEModel(config).train()
    batch = make_batch()
    calls, dropped = collections.Counter(), []
    combine, build = moe_implementations.combine_assignments, modeling.build_token_dispatch
    mode = ["ordered"]

    def counting_combine(*args):
        calls[mode[0]] += 1
        return combine(*args)

    def recording_build(*args):
        dispatch = build(*args)
        dropped.append(float(dispatch.dropped_fraction))
        return dispatch

    monkeypatch.setattr(moe_implementations, "combine_assignments", counting_combine)  # per projection
    monkeypatch.setattr(modeling, "combine_assignments", counting_combine)  # the MLP kept in expert order
    monkeypatch.setattr(modeling, "build_token_dispatch", recording_build)
    torch.manual_seed(1)
    ordered = model(**batch)
    ordered_grads = torch.autograd.grad(ordered.last_hidden_state.square().sum() + ordered.aux_loss, list(model.parameters()))
    mode[0] = "plain"
    with unsorted_layers():
        torch.manual_seed(1)
        plain = model(**batch)
        plain_grads = torch.autograd.grad(plain.last_hidden_state.square().sum() + plain.aux_loss, list(model.parameters()))
    layers = config.num_hidden_layers
    assert calls == {"ordered": 3 * layers, "plain": 4 * layers}  # qkv, out, then one combine per MLP instead of two
    assert (max(dropped) > 0) == (capacity is not None)
    assert torch.equal(ordered.last_hidden_state, plain.last_hidden_state)
    for a, b in zip(ordered_grads, plain_grads):
        assert torch.equal(a, b)


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
    assert model._merge_cache.entry is None  # a forward with grad frees what inference cached
    assert not torch.equal(updated, first)


def _generic_batch(config):
    """Inputs and candidates of one step: inputs in two route groups, candidates in a third."""
    batch = _attribute_batch()
    targets = torch.randint(0, 49408, (4, 3), generator=torch.Generator().manual_seed(2))
    return dict(batch, target_input_ids=targets, target_attribute_vectors=torch.tensor([[0.0, 1, 0, 1, 0, 1, 1, 0]]).expand(4, 8),
                target_task_ids=torch.tensor([3, 3, 1, 3]), labels=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("routing", ["attribute", "task", "modality"])
def test_one_merge_per_step_serves_inputs_and_candidates(routing, monkeypatch):
    """A step with candidates merges each expert linear once over the route keys of both passes; outputs
    and gradients equal those of one merge per pass (no router noise: the decisions are then identical)."""
    config = tiny_config(routing, moe_router_noise_std=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(config).train()
    batch = _generic_batch(config)
    calls = collections.Counter()
    original = UniPerceiverMoELinear.merged_parameters

    def counting(self, *args, **kwargs):
        calls[self.name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UniPerceiverMoELinear, "merged_parameters", counting)
    from modeling_uniperceiver_moe.routing import RouteGroups

    matched, keyed = [], []
    within_table = RouteGroups.within_table.__func__
    monkeypatch.setattr(RouteGroups, "within_table", classmethod(lambda cls, *a: matched.append(1) or within_table(cls, *a)))
    route_keys = UniPerceiverMoEModel._route_keys
    monkeypatch.setattr(UniPerceiverMoEModel, "_route_keys", lambda self, *a, **k: keyed.append(1) or route_keys(self, *a, **k))

    def step():
        out = model(**batch)
        return out.loss, torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)

    shared_loss, shared_grads = step()
    experts = [m for m in model.modules() if isinstance(m, UniPerceiverMoELinear)]
    assert experts and all(calls[m.name] == 1 for m in experts), calls
    # attribute/task passes take their groups from the table's own reading (`for_batch`); modality's
    # shared all-modality table is matched per pass; only then are per-token route keys built (host work
    # on each pass of a training step, the route inputs staying on the host)
    assert len(matched) == len(keyed) == (2 if routing == "modality" else 0)
    calls.clear()
    monkeypatch.setattr(UniPerceiverMoEModel, "merge_for_step", lambda self, *a, **k: (None, None))
    separate_loss, separate_grads = step()
    assert all(calls[m.name] == 2 for m in experts), calls
    torch.testing.assert_close(shared_loss, separate_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(shared_grads, separate_grads):
        if a is not None or b is not None:  # float32 sums over the merged tables in another order
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_merge_names_route_keys_it_does_not_cover():
    model = UniPerceiverMoEModel(tiny_config("task")).train()
    batch = make_batch()
    merged = model.merged_experts([model.route_key_table(task_ids=torch.tensor([0, 1]))], torch.float32)[0]
    with pytest.raises(ValueError, match=r"route keys \[2\] were not in merged_experts.keys"):
        model(**batch, merged_experts=merged)  # the batch's task ids are 0, 1, 2


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
    Task ids are range-checked by the route grouping's own host read, not by a second one. (Modality
    routing range-checks its ids once per forward, so it is not compared.)"""
    dense = _host_reads("none")
    for routing in ("token", "context", "attribute", "task"):
        assert _host_reads(routing) == dense, routing


@pytest.mark.parametrize("routing, step, layers_per_graph", [
    ("attribute", False, None), ("token", False, None), ("context", False, None), ("attribute", True, None),
    ("token", True, None), ("attribute", True, 2)])
def test_compiled_encoder_is_one_graph_and_matches_eager(routing, step, layers_per_graph):
    """`compile_encoder` traces the whole layer stack, or spans of `layers_per_graph` layers (here 2 of 3:
    spans of unequal length), and the expert merge without a graph break
    (fullgraph=True raises on one), including sorted rows, drop path and the grouped GEMM, and computes
    what eager computes (outputs and gradients, the latter to bf16 rounding). `step`: a whole
    GenericPerception step, whose two encoder passes share one merge (split views of it) or, with token
    routing, one cast of the experts (`cast_experts`).
    bf16 autocast: the CPU grouped GEMM is traced in bf16 only.
    torch 2.11 broke the graph at a dict cache on a routing dataclass that torch 2.13 traces, so on the CPU
    stack this guards the structure, not every version's tracer (the GPU benchmark prints graph breaks)."""
    torch._dynamo.reset()
    config = tiny_config(routing, drop_path_rate=0.2, num_hidden_layers=3)
    batch = _attribute_batch()

    if step:
        batch = _generic_batch(config)

    def run(compiled):
        torch.manual_seed(0)
        model = (UniPerceiverMoEForGenericPerception if step else UniPerceiverMoEModel)(config).train()
        if compiled:
            model.compile_encoder(layers_per_graph, fullgraph=True, dynamic=False, backend="aot_eager")
        torch.manual_seed(1)  # same drop-path draws and router noise
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        out = out.loss if step else out.last_hidden_state
        grads = torch.autograd.grad(out.float().square().sum(), list(model.parameters()), allow_unused=True)
        return out, grads, [name for name, _ in model.named_parameters()]

    (eager_out, eager_grads, names), (compiled_out, compiled_grads, _) = run(False), run(True)
    torch.testing.assert_close(compiled_out, eager_out)
    assert sum(g is not None for g in eager_grads) > 10
    for name, a, b in zip(names, compiled_grads, eager_grads):
        assert (a is None) == (b is None)
        if a is not None:  # bf16 backward: the traced graph may round in another order, so single elements
            # that cancel can differ by more than bf16's step; the whole gradient agrees to bf16 rounding.
            # A router's gradient is a reduction over every element of the merged weights it gates, in bf16
            # here: its rounding is a few times larger
            tolerance = 5e-2 if ".router." in name else 2e-2
            assert float((a - b).float().norm()) <= tolerance * float(b.float().norm()) + 1e-6, name
    torch._dynamo.reset()


@pytest.mark.parametrize("routing, layers_per_graph", [("attribute", 1), ("token", 1), ("attribute", 2)])
def test_compiled_moe_layers_share_their_graphs(routing, layers_per_graph):
    """Compiled layer by layer, every MoE layer runs the same graph for the same shapes, and compiled in
    spans of layers, every span of the same layer kinds: a layer reads its merged or cast experts from a
    view named within the layer (`RoutingState.for_layer`), built outside the compiled span, not by its layer
    index, which the compiler would specialise on. A step's graphs do not grow with the depth (with one
    graph per layer, warm-up and guard checks grew with it)."""
    from torch._dynamo.utils import counters

    def graphs(layers: int) -> int:
        torch._dynamo.reset()
        counters.clear()
        config = tiny_config(routing, num_hidden_layers=layers)
        model = UniPerceiverMoEForGenericPerception(config).train()
        model.compile_encoder(layers_per_graph=layers_per_graph, fullgraph=True, dynamic=False, backend="eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**_generic_batch(config)).loss.backward()
        return counters["stats"]["unique_graphs"]

    try:
        assert graphs(2) == graphs(4)  # every layer of the tiny config has experts
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("routing", ["token", "attribute"])
def test_whole_model_compiles_with_its_caches(routing):
    """`torch.compile(model)` (the whole model, as transformers users do; not `compile_encoder`) runs a
    training forward and backward and then inference, twice, computing what eager computes. The caches'
    bookkeeping (kept expert casts, the inference merge with its fixed-address marks) runs outside the
    traced graph; before, tracing it failed on `mark_static_address`."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config(routing, moe_router_noise_std=0.0, drop_path_rate=0.0))
    batch = _attribute_batch()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled.train()(**batch).last_hidden_state
            expected = model(**batch).last_hidden_state
        out.float().square().sum().backward()
        torch.testing.assert_close(out, expected)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(compiled.eval()(**batch).last_hidden_state, model.eval()(**batch).last_hidden_state)
    torch._dynamo.reset()


def test_drop_path_scales_follow_the_linear_or_the_fixed_schedule():
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
    fixed = drop_path_scales(0.3, 4, 20000, "cpu", training=True, schedule="fixed")  # the reference's MoE configs
    for layer in range(4):
        kept = fixed[layer] > 0
        assert torch.allclose(fixed[layer][kept], torch.tensor(1 / 0.7))
        assert abs((~kept).float().mean().item() - 0.3) < 0.01


def test_compiled_inference_caches_its_own_copy_of_the_merge():
    """With a compiled merge (CUDA graphs keep outputs in a pool that the next replay overwrites) the
    inference cache holds clones; cached forwards still equal eager ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config("attribute")).eval()
    batch = _attribute_batch()
    with torch.no_grad():
        eager = model(**batch).last_hidden_state
        model.compile_encoder(backend="eager")
        first = model(**batch).last_hidden_state
        (merged,) = model._merge_cache.entry[1]
        second = model(**batch).last_hidden_state
        assert model._merge_cache.entry[1][0] is merged  # reused, not merged again
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(second, eager)
    torch._dynamo.reset()


def test_grouping_within_a_merge_table_equals_grouping_from_scratch():
    """`RouteGroups.within_table` (tokens grouped by the key table experts were merged for, no second
    torch.unique) gives the groups `from_keys` gives; with unused table rows it keeps only the used ones."""
    from modeling_uniperceiver_moe.routing import RouteGroups

    tokens = torch.tensor([[0.0, 1], [1, 0], [0, 1], [1, 1], [1, 0]])
    plain = RouteGroups.from_keys(tokens)
    grouped, rows = RouteGroups.within_table(tokens, plain.keys, "in the table")
    assert rows is None
    for name in ("keys", "token_group", "order", "inverse_order", "sorted_group", "offsets"):
        assert torch.equal(getattr(grouped, name), getattr(plain, name)), name
    table = torch.tensor([[0.0, 0], [0, 1], [1, 0], [1, 1], [2, 2]])  # rows 0 and 4 unused
    grouped, rows = RouteGroups.within_table(tokens, table, "in the table")
    assert rows.tolist() == [1, 2, 3]
    for name in ("keys", "token_group", "offsets"):
        assert torch.equal(getattr(grouped, name), getattr(plain, name)), name
    with pytest.raises(ValueError, match=r"route keys \[\[3.0, 3.0\]\] were not in the table"):
        RouteGroups.within_table(torch.tensor([[3.0, 3]]), table, "in the table")


@pytest.mark.parametrize("width, values", [(1, "bits"), (8, "bits"), (10, "bits"), (11, "bits"), (4, "reals"), (0, "ids")])
def test_distinct_route_keys_equal_torch_unique(width, values):
    """Keys read as integer codes (ids with a bound, 0/1 vectors up to MAX_CODED_ATTRIBUTES wide) come out
    exactly as `torch.unique(dim=0, return_inverse=True)` gives them; wider or non-0/1 vectors fall back
    to it."""
    from modeling_uniperceiver_moe.routing import distinct_route_keys, route_key_signature

    g = torch.Generator().manual_seed(width)
    if values == "ids":
        keys = torch.tensor([4, 0, 4, 2, 2, 0, 4])
        found = distinct_route_keys(keys, num_ids=6, return_groups=True)
    else:
        keys = (torch.rand(400, width, generator=g) < 0.3).float() if values == "bits" else torch.rand(40, width, generator=g)
        found = distinct_route_keys(keys, return_groups=True)
    expected = torch.unique(keys, dim=0, return_inverse=True)
    assert found[0].dtype == keys.dtype
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    assert torch.equal(distinct_route_keys(keys, num_ids=6 if values == "ids" else None), expected[0])
    # the signature kept from the host-side reading equals the one read back from the table
    assert route_key_signature(found[0]) == route_key_signature(found[0].clone())


def test_distinct_route_keys_name_out_of_range_ids():
    from modeling_uniperceiver_moe.routing import distinct_route_keys

    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\), got \[-1, 7\]"):
        distinct_route_keys(torch.tensor([0, 7, -1, 2]), num_ids=3, name="task")
    model = UniPerceiverMoEModel(tiny_config("task")).train()
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 4\), got \[5\]"):
        model.route_key_table(task_ids=torch.tensor([0, 5]))


def test_inference_merge_cache_keeps_static_addresses():
    """The cached merge is marked as fixed-address graph input, so CUDA graphs replay without copying it."""
    model = UniPerceiverMoEModel(tiny_config("task")).eval()
    with torch.no_grad():
        merged = model.merged_experts([model.route_key_table(task_ids=torch.tensor([0, 1]))], torch.float32)[0]
        assert model.merged_experts([model.route_key_table(task_ids=torch.tensor([1, 0]))], torch.float32)[0] is merged
    tensors = [t for pair in merged.weights.values() for t in pair] + list(merged.gates.values())
    assert tensors and all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in tensors)


def test_merge_cache_sees_replaced_parameters_and_modules(monkeypatch):
    """The inference merge cache keeps its list of router/expert parameters between forwards (no walk over
    the modules per step) and still re-merges after a parameter or a router is replaced, not only after
    in-place updates."""
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config("attribute")).eval()
    batch = _attribute_batch()
    walks = collections.Counter()
    gated_linears = modeling.UniPerceiverMoELayer.gated_linears
    monkeypatch.setattr(modeling.UniPerceiverMoELayer, "gated_linears",
                        lambda self: walks.update(["walk"]) or gated_linears(self))
    with torch.no_grad():
        first = model(**batch).last_hidden_state
        walked = walks["walk"]
        assert torch.equal(model(**batch).last_hidden_state, first)
        assert walks["walk"] == walked  # the cached forward walked nothing
        expert = next(m for m in model.modules() if isinstance(m, UniPerceiverMoELinear))
        expert.weight = torch.nn.Parameter(expert.weight + 1.0)  # a new parameter object, version 0
        replaced = model(**batch).last_hidden_state
        assert not torch.equal(replaced, first)
        gate = next(m for m in model.modules() if isinstance(m, modeling.UniPerceiverMoEGate))
        gate.router = modeling.build_router(model.config, gate.role)  # a new router module
        rerouted = model(**batch).last_hidden_state
        assert not torch.equal(rerouted, replaced)
        layer = model.encoder.layers[1]
        layer.attention = copy.deepcopy(layer.attention)  # a whole block replaced by a copy ...
        layer.attention.qkv.weight.mul_(0.5)  # ... whose experts then change in place (version 0 again)
        reblocked = model(**batch).last_hidden_state
        assert not torch.equal(reblocked, rerouted)
    torch.testing.assert_close(reblocked, model(**batch).last_hidden_state.detach())  # equals a fresh merge


def test_importing_the_package_installs_no_global_module_hooks():
    import torch.nn.modules.module as torch_module

    hooks = [*torch_module._global_module_registration_hooks.values(),
             *torch_module._global_parameter_registration_hooks.values(),
             *torch_module._global_buffer_registration_hooks.values()]
    assert not [hook for hook in hooks if getattr(hook, "__module__", "").startswith("modeling_uniperceiver_moe")]


def test_one_route_group_skips_the_sort(monkeypatch):
    """A batch in one route group (one task) gets the identity order without a sort, as the sort gives it."""
    from modeling_uniperceiver_moe import routing
    from modeling_uniperceiver_moe.routing import RouteGroups, stable_group_order

    keys = torch.tensor([[1.0, 0, 1]])
    with monkeypatch.context() as patched:
        patched.setattr(routing, "stable_group_order", lambda *a: pytest.fail("sorted a single route group"))
        groups = RouteGroups.from_token_groups(keys, torch.zeros(7, dtype=torch.long))
    order, inverse, counts = stable_group_order(torch.zeros(7, dtype=torch.long), 1)
    assert torch.equal(groups.order, order) and torch.equal(groups.inverse_order, inverse)
    assert torch.equal(groups.offsets, torch.cumsum(counts, 0).int()) and groups.offsets.dtype == torch.int32
    assert torch.equal(groups.sorted_group, torch.zeros(7, dtype=torch.long))


def test_route_tables_keep_their_signature_when_moved():
    """`to_device` carries the signature `distinct_route_keys` read on the host (the merge cache's key), so
    the cache never reads a moved table back; a tensor already on the device is returned as is."""
    from modeling_uniperceiver_moe.routing import distinct_route_keys, to_device

    keys = distinct_route_keys(torch.tensor([[0.0, 1], [1, 1], [0, 1]]))
    assert to_device(keys, keys.device) is keys
    moved = to_device(keys, torch.device("meta"))
    assert moved.device.type == "meta" and moved._route_key_signature == keys._route_key_signature
    assert to_device(None, torch.device("meta")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host route keys on a CUDA model")
@pytest.mark.parametrize("routing", ["attribute", "task"])
def test_host_route_keys_equal_device_keys_without_waiting_for_the_gpu(routing):
    """Route inputs left on the CPU give the outputs device route inputs give, and the step's expert merge
    (`merge_for_step`) then never makes the host wait for the GPU."""
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(routing)).cuda().eval()
    batch = _attribute_batch()
    batch.update(task_ids=torch.tensor([0, 1, 1]), target_input_ids=batch["input_ids"][:, :3],
                 target_task_ids=torch.tensor([2, 2, 2]), target_attribute_vectors=torch.tensor([[0.0, 1, 1, 0, 0, 1, 1, 0]] * 3))
    route_inputs = ("attribute_vectors", "task_ids", "target_attribute_vectors", "target_task_ids")
    on_device = {k: v.cuda() for k, v in batch.items()}
    on_host = {k: v if k in route_inputs else v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        expected = model(**on_device).logits
        assert torch.equal(model(**on_host).logits, expected)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            merged = model.uniperceiver.merge_for_step(*(on_host[k] for k in route_inputs))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(m is not None for m in merged)


@pytest.mark.parametrize("routing", ["attribute", "task"])
def test_step_merge_reads_both_route_tables_at_once(routing, monkeypatch):
    """`merge_for_step` reads the inputs' and the candidates' route tables in one host read (each read
    waits for the GPU), and they equal the tables read one by one; the `attribute-unique` ablation of the
    benchmark really goes through `torch.unique`."""
    from benchmarks.bench_moe import sorted_route_keys

    model = UniPerceiverMoEForGenericPerception(tiny_config(routing)).eval()
    inputs = torch.tensor([[1.0, 0, 0, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 1, 0, 1]])[:, None].expand(2, 6, 8)
    targets = torch.tensor([[1.0, 1, 0, 1, 0, 1, 1, 0]] * 3)
    route_inputs = (inputs, torch.tensor([2, 0]), targets, torch.tensor([3, 3, 3]))
    reads = collections.Counter()
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.update(["read"]) or tolist(self))
    with torch.no_grad():
        merged = model.uniperceiver.merge_for_step(*route_inputs)
    assert reads["read"] == 1
    separate = [model.uniperceiver.route_key_table(**{("attribute_vectors" if routing == "attribute" else "task_ids"): v},
                                                   return_groups=True) for v in route_inputs[(0 if routing == "attribute" else 1)::2]]
    for entry, (table, groups) in zip(merged, separate):
        assert torch.equal(entry.keys, table) and torch.equal(entry.token_group, groups)
    unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: reads.update(["unique"]) or unique(*a, **k))
    with sorted_route_keys(), torch.no_grad():
        model.train()  # no cache
        model.uniperceiver.merge_for_step(*route_inputs)
    assert reads["unique"] == 2


@pytest.mark.parametrize("routing", ["attribute", "task"])
def test_broadcast_route_inputs_are_read_once_per_distinct_slice(routing, monkeypatch):
    """Route inputs given as a broadcast (`expand`: one attribute row for every candidate, the same per-token
    rows for every sequence, one task id for every sequence) give the tables and groups their materialised
    copies give, and the host reads only the slice they repeat (of small ones, all their entries). The groups
    are dense tensors: a stride-0 view cannot be pinned for its copy to a GPU (`pin_memory` refuses it)."""
    from modeling_uniperceiver_moe import routing as routing_module

    model = UniPerceiverMoEModel(tiny_config(routing)).eval()
    if routing == "attribute":
        per_token = torch.tensor([[1.0, 0, 0, 1, 1, 0, 0, 0]] * 2 + [[1.0, 1, 0, 1, 0, 1, 0, 1]] * 4)
        route_inputs = [per_token[None].expand(50, 6, 8), torch.tensor([[1.0, 1, 0, 1, 0, 1, 1, 0]]).expand(500, 8),
                        torch.tensor([[0.0, 1, 0, 1, 0, 1, 1, 0]]).expand(10, 8)]  # small: read whole
        distinct_rows = [6, 1, 10]
    else:
        route_inputs = [torch.tensor([2]).expand(3000), torch.tensor([[1, 3, 3]]).expand(1000, 3), torch.tensor([3]).expand(5)]
        distinct_rows = [1, 3, 5]
    read = []
    presence = routing_module._route_key_presence
    monkeypatch.setattr(routing_module, "_route_key_presence", lambda keys, *a: read.append(keys.shape[0]) or presence(keys, *a))
    broadcast = model.route_key_tables(route_inputs, return_groups=True)
    assert read == distinct_rows
    materialised = model.route_key_tables([values.clone() for values in route_inputs], return_groups=True)
    for (table, groups), (expected_table, expected_groups) in zip(broadcast, materialised):
        assert torch.equal(table, expected_table) and torch.equal(groups, expected_groups)
        assert groups.is_contiguous() and table.is_contiguous()


def _expert_linears(model) -> list[UniPerceiverMoELinear]:
    return [m for m in model.modules() if isinstance(m, UniPerceiverMoELinear)]


@pytest.mark.parametrize("routing", ["token", "context"])
def test_token_routing_inference_casts_the_experts_once(routing, monkeypatch):
    """Under bf16 autocast a token/context-routed inference forward takes its experts from bf16 buffers kept
    by the model (`cast_experts`): the same outputs, bit for bit, as each linear casting its own float32
    experts; the buffers are reused while the parameters are unchanged and re-filled in place after an
    in-place update."""
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config(routing)).eval()
    batch = make_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cached = model(**batch).last_hidden_state
        copy = model._cast_cache.entry[2]
        assert copy and all(w.dtype == torch.bfloat16 for pair in copy.values() for w in pair)
        addresses = [w.data_ptr() for pair in copy.values() for w in pair]
        assert torch.equal(model(**batch).last_hidden_state, cached) and model._cast_cache.entry[2] is copy
        expert = _expert_linears(model)[0]
        expert.weight.mul_(2.0)
        updated = model(**batch).last_hidden_state
        weights = model._cast_cache.entry[2]
        assert weights is not copy and not torch.equal(updated, cached)
        assert [w.data_ptr() for pair in weights.values() for w in pair] == addresses  # same buffers, new values
        assert torch.equal(weights[expert.name][0], expert.weight.to(torch.bfloat16))
        with per_pass_casts():
            assert torch.equal(model(**batch).last_hidden_state, updated)  # each linear casting its own experts
    model.float()  # nothing to cast without autocast: the buffers are freed
    with torch.no_grad():
        model(**batch)
    assert model._cast_cache.entry is None


class _CountCasts:
    """Counts `_CastInto` forwards and backwards (one each per expert weight and bias when shared)."""

    def __init__(self, monkeypatch):
        self.calls = collections.Counter()
        forward, backward = moe_implementations._CastInto.forward, moe_implementations._CastInto.backward

        def counted(name, fn):
            return staticmethod(lambda *a: self.calls.update([name]) or fn(*a))

        monkeypatch.setattr(moe_implementations._CastInto, "forward", counted("forward", forward))
        monkeypatch.setattr(moe_implementations._CastInto, "backward", counted("backward", backward))


def _token_step_grads(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    return out.loss.detach(), dict(zip([n for n, _ in model.named_parameters()], grads))


@pytest.mark.parametrize("routing", ["token", "context"])
def test_training_step_shares_one_expert_cast_between_its_passes(routing, monkeypatch):
    """A bf16 training step with candidates (two encoder passes) casts each expert weight and bias once and
    casts its gradient back once (not once per pass). The loss and every gradient but the experts' are
    bit-identical to casting per pass; the experts' gradients differ only by the bf16 sum of the two passes'
    gradients, taken before the cast back (autocast's rule for dense weights in eager mode). With one
    pass (`target_features` given) the experts' gradients are bit-identical too."""
    config = tiny_config(routing, moe_router_noise_std=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(config).train()
    batch = _generic_batch(config)
    counter = _CountCasts(monkeypatch)
    shared_loss, shared = _token_step_grads(model, batch)
    tensors = 2 * len(_expert_linears(model))
    assert counter.calls == {"forward": tensors, "backward": tensors}
    with per_pass_casts():  # the benchmark's ablation
        per_pass_loss, per_pass = _token_step_grads(model, batch)
    assert counter.calls == {"forward": tensors, "backward": tensors}  # the per-pass path does not use it
    assert torch.equal(shared_loss, per_pass_loss)
    experts = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, UniPerceiverMoELinear) for p in ("weight", "bias")}
    for name, grad in shared.items():
        if name in experts:
            torch.testing.assert_close(grad, per_pass[name], rtol=2**-7, atol=1e-6)
        elif grad is not None or per_pass[name] is not None:
            assert torch.equal(grad, per_pass[name]), name

    one_pass = {k: v for k, v in batch.items() if not k.startswith("target_")}
    one_pass["target_features"] = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(3))
    _, shared = _token_step_grads(model, one_pass)
    with per_pass_casts():
        _, per_pass = _token_step_grads(model, one_pass)
    for name in experts:
        assert torch.equal(shared[name], per_pass[name]), name


def test_shared_expert_cast_follows_optimizer_steps_and_gradient_accumulation(monkeypatch):
    """Across steps the kept cast is re-filled after every optimizer step (never stale) and reused between
    the forwards of an accumulation window; two forwards before one backward also work. At every step, from
    the same weights, its accumulated gradients equal those of casting per pass (a stale cast would give
    the previous step's gradients). The two paths are compared step by step rather than as two whole runs:
    bf16 training drifts apart from a 1e-6 change of the weights within three steps, whatever the casting."""
    config = tiny_config("token", moe_router_noise_std=0.0, drop_path_rate=0.0)
    batch = _generic_batch(config)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    counter = _CountCasts(monkeypatch)
    experts = {id(p) for m in _expert_linears(model) for p in (m.weight, m.bias)}

    def window(share: bool) -> tuple[list[float], list[torch.Tensor]]:
        """Two accumulated micro-batches: their losses and the accumulated gradients (then cleared)."""
        losses = []
        with contextlib.nullcontext() if share else per_pass_casts():
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(**batch).loss
                loss.backward()
                losses.append(loss.item())
            if share:
                expert = _expert_linears(model)[0]
                assert torch.equal(model.uniperceiver._cast_cache.entry[2][expert.name][0], expert.weight.to(torch.bfloat16))
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        optimizer.zero_grad()
        return losses, grads

    for step in range(3):
        per_pass_losses, per_pass = window(False)
        shared_losses, shared = window(True)
        assert shared_losses == per_pass_losses, step
        for parameter, a, b in zip(model.parameters(), shared, per_pass):
            assert (a is None) == (b is None)
            if a is None:
                continue
            if id(parameter) in experts:  # the bf16 sum of the two passes' gradients before the cast back
                torch.testing.assert_close(a, b, rtol=2**-6, atol=1e-3 * b.abs().max().item())
            else:
                assert torch.equal(a, b), step
        for parameter, grad in zip(model.parameters(), shared):
            parameter.grad = grad
        optimizer.step()
        optimizer.zero_grad()
    tensors = 2 * len(_expert_linears(model))
    shared_forwards = counter.calls["forward"]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # two forwards, one backward
        (model(**batch).loss + model(**batch).loss).backward()
    assert shared_forwards == 3 * tensors  # once per optimizer step's window
    assert counter.calls["forward"] == 4 * tensors  # and once for the final two forwards
    assert all(p.grad is not None for p in model.parameters() if id(p) in experts)


def test_kept_cast_and_merge_are_not_reused_after_a_fused_adamw_step():
    """torch's fused AdamW changes the parameters in place without bumping their version counters, so a
    cache keyed by (address, version) alone would go on feeding the step-1 experts to every later forward
    (bf16 token routing trained on its initial experts, and a run resumed from a checkpoint suddenly saw the
    trained ones). After each step the loss equals that of a copy of the model, which holds no cache; so
    does an evaluation's, whose merge (attribute routing) was kept from before the step."""
    config = tiny_config("token", moe_router_noise_std=0.0, drop_path_rate=0.0)
    batch = _generic_batch(config)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        fresh = copy.deepcopy(model)
        assert fresh.uniperceiver._cast_cache.entry is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(loss.detach(), fresh(**batch).loss.detach()), step
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation between steps
            assert torch.equal(model(**batch).loss, fresh(**batch).loss), step
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model = UniPerceiverMoEForGenericPerception(tiny_config("attribute", drop_path_rate=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.train()(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss  # keeps its merge of the experts
        assert model.uniperceiver._merge_cache.entry is not None
        optimizer.step()
        after = model(**batch).loss
        assert not torch.equal(after, before) and torch.equal(after, copy.deepcopy(model)(**batch).loss)


def test_kept_cast_history_does_not_grow_across_steps():
    """Each re-fill of the kept cast starts a fresh autograd history: its node leads to the float32
    parameter only, never to the previous update's cast (a chain that grew by one node per step, per
    expert tensor, and that every backward walked), and the buffers keep their fixed-address mark."""
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config("token", moe_router_noise_std=0.0, drop_path_rate=0.0)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).last_hidden_state.float().square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        for expert in _expert_linears(model):
            for cast, parameter in zip(model._cast_cache.entry[2][expert.name], (expert.weight, expert.bias)):
                (accumulate, _), (previous, _) = cast.grad_fn.next_functions
                assert accumulate.variable is parameter and previous is None
                assert getattr(cast, "_dynamo_static_input_type", None) == "unguarded"


@pytest.mark.parametrize("routing", ["token", "attribute"])
def test_models_with_filled_caches_copy_and_pickle(routing):
    """After a training forward (token routing: a cast with autograd history) or an inference forward
    (attribute routing: a cached merge), `copy.deepcopy` and pickling work; the copy starts with empty
    caches and computes what the source computes."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config(routing, moe_router_noise_std=0.0, drop_path_rate=0.0))
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if routing == "token":
            model.train()(**batch)
            assert model._cast_cache.entry is not None
        else:
            with torch.no_grad():
                model.eval()(**batch)
            assert model._merge_cache.entry is not None
        clone = copy.deepcopy(model)
        unpickled = pickle.loads(pickle.dumps(model))
        torch.save(model, io.BytesIO())
        assert clone._cast_cache.entry is None and clone._merge_cache.entry is None
        assert unpickled._cast_cache.entry is None and unpickled._merge_cache.entry is None
        with torch.no_grad():
            expected = model.eval()(**batch).last_hidden_state
            for other in (clone, unpickled):
                assert torch.equal(other.eval()(**batch).last_hidden_state, expected)


def test_kept_cast_serves_no_grad_forwards_and_follows_freezing(monkeypatch):
    """A forward without grad between a forward with grad and its backward reuses the kept cast (no re-fill,
    so the pending backward works and gives the same gradients). Freezing or unfreezing experts between
    forwards re-casts: gradients reach exactly the trainable experts."""
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config("token", moe_router_noise_std=0.0, drop_path_rate=0.0)).train()
    batch = make_batch()
    experts = _expert_linears(model)
    counter = _CountCasts(monkeypatch)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).last_hidden_state.float().square().sum()

    expected = torch.autograd.grad(loss(), [experts[0].weight])[0]
    first = loss()
    with torch.no_grad():
        loss()
    assert torch.equal(torch.autograd.grad(first, [experts[0].weight])[0], expected)
    assert counter.calls["forward"] == 2 * len(experts)  # one cast served all three forwards

    experts[0].requires_grad_(False)
    loss().backward()
    assert experts[0].weight.grad is None and experts[1].weight.grad is not None
    model.zero_grad(set_to_none=True)
    experts[0].requires_grad_(True)
    loss().backward()
    assert torch.equal(experts[0].weight.grad, expected)
    assert counter.calls["forward"] == 3 * 2 * len(experts)  # re-cast after freezing and after unfreezing


def test_in_place_update_between_forward_and_backward_is_an_error():
    """A parameter changed in place after a forward re-fills the kept cast at the next forward; the first
    forward's backward then fails loudly (autograd's version check) instead of using the new values."""
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config("token")).train()
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(**batch).last_hidden_state
        with torch.no_grad():
            _expert_linears(model)[0].weight.add_(1.0)
        model(**batch)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.float().sum().backward()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_by_max_equals_topk(top_k):
    """The compiled gates' top-k (`top_k_by_max`, max-reductions) gives `torch.topk`'s values and experts,
    and the same gradient; exact ties go to the lowest expert index."""
    from modeling_uniperceiver_moe.routing import top_k_by_max

    g = torch.Generator().manual_seed(top_k)
    probs = torch.rand(500, 8, generator=g).softmax(-1).requires_grad_()
    values, index = top_k_by_max(probs, top_k)
    expected_values, expected_index = probs.topk(top_k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(index, expected_index)
    upstream = torch.rand(500, top_k, generator=g)
    grad = torch.autograd.grad((values * upstream).sum(), probs)[0]
    expected_grad = torch.autograd.grad((expected_values * upstream).sum(), probs)[0]
    assert torch.equal(grad, expected_grad)
    tied = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    assert top_k_by_max(tied, top_k)[1].tolist() == [list(range(top_k))]
