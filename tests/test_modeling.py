"""Exact equivalences and behaviours of the encoder, the MoE linear and the similarity head."""

import pytest
import torch
from transformers import AutoModel

from modeling_uniperceiver_moe import (
    UniPerceiverMoEForGenericPerception,
    UniPerceiverMoEModel,
    caption_attention_pattern,
    fold_experts,
)
from modeling_uniperceiver_moe.modeling_uniperceiver_moe import (
    UniPerceiverMoELinear,
    text_distance_bias,
    text_distance_slopes,
)
from modeling_uniperceiver_moe.moe_implementations import grouped_linear
from modeling_uniperceiver_moe.routing import (
    GateDecision,
    MergedDispatch,
    one_hot_rows,
    RouteGroups,
    TokenDispatch,
    build_token_dispatch,
    stable_group_order,
    load_balancing_loss,
    select_top_k,
)
from tests.conftest import ROUTINGS, make_batch, tiny_config


def encoder(routing, **overrides):
    return UniPerceiverMoEModel(tiny_config(routing, **overrides)).eval()


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("routing", ROUTINGS)
def test_save_load_round_trip_is_bit_identical(routing, tmp_path):
    model = UniPerceiverMoEForGenericPerception(tiny_config(routing)).eval()
    batch = make_batch()
    targets = make_batch(batch=4, seed=1, with_image=False)
    kwargs = dict(**batch, target_input_ids=targets["input_ids"], target_attention_mask=targets["attention_mask"],
                  target_attribute_vectors=targets["attribute_vectors"], target_task_ids=targets["task_ids"])
    before = model(**kwargs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path).eval()
    assert torch.equal(before, loaded(**kwargs).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_auto_model_loads_the_encoder_of_a_saved_head(tmp_path):
    head = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
    head.uniperceiver.save_pretrained(tmp_path)
    encoder_model = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(encoder_model, UniPerceiverMoEModel)
    batch = make_batch()
    assert torch.equal(head.uniperceiver(**batch).last_hidden_state, encoder_model(**batch).last_hidden_state)


def test_corrupt_checkpoint_raises(tmp_path):
    encoder("attribute").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        AutoModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ MoE linear
def reference_moe_linear(layer, x, gates_per_token):
    """Unmerged reference: sum over experts of g_e * (x W_e^T + b_e), one expert at a time."""
    out = torch.zeros(x.shape[0], layer.out_features)
    for e in range(layer.num_experts):
        out += gates_per_token[:, e : e + 1] * (x @ layer.weight[e].t() + layer.bias[e])
    return out


def head_step_batch(seed=0) -> dict:
    """Inputs in several route groups, four text candidates of their own route and labels (a training step
    of the similarity head)."""
    g = torch.Generator().manual_seed(seed + 1)
    batch = make_batch(seed=seed)
    batch.update(target_input_ids=torch.randint(0, 49408, (4, 3), generator=g),
                 target_attribute_vectors=torch.tensor([[0.0, 1, 0, 1, 0, 1, 1, 0]]).expand(4, 8),
                 target_task_ids=torch.full((4,), 3), labels=torch.tensor([0, 2, 1]))
    return batch


@pytest.mark.parametrize("routing, top_k, capacity", [
    ("token", 2, None), ("token", 1, 0.5), ("context", 2, None), ("context", 1, None),
    ("modality", 2, None), ("task", 2, None), ("attribute", 2, None), ("attribute", 1, None), ("folded", 2, None)])
def test_grouped_mm_experts_equal_the_eager_experts(routing, top_k, capacity):
    """`experts_implementation="grouped_mm"` (grouped GEMMs, rows kept sorted, one merge per step, kept
    casts, the top-1 MLP in expert order) computes what the eager loop states: the same loss, logits and
    gradient of every parameter in a training step, and the same logits at inference (merge cache)."""
    folded = routing == "folded"
    config = tiny_config("attribute" if folded else routing, moe_top_k=top_k, moe_capacity_factor=capacity,
                         moe_router_noise_std=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(config)
    batch = head_step_batch()
    if folded:
        routes = torch.cat([batch["attribute_vectors"], batch["target_attribute_vectors"]]).unique(dim=0)
        model = fold_experts(model, routes)
    assert model.config._experts_implementation == "grouped_mm"  # the default
    parameters = [p for p in model.parameters() if p.requires_grad]

    def step(implementation):
        model.set_experts_implementation(implementation)
        model.train()
        out = model(**batch)
        grads = torch.autograd.grad(out.loss, parameters, allow_unused=True)
        model.eval()
        with torch.no_grad():
            model(**batch)  # fills the inference caches
            logits = model(**batch).logits  # served from them
        return out.loss.detach(), out.logits.detach(), grads, logits

    fast, eager = step("grouped_mm"), step("eager")
    torch.testing.assert_close(fast[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], eager[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(fast[2], eager[2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[3], eager[3], rtol=1e-5, atol=1e-5)


def test_experts_implementation_is_chosen_like_transformers(tmp_path):
    """`from_pretrained(..., experts_implementation=...)` and `set_experts_implementation` pick it; an unknown
    one is refused by name."""
    model = UniPerceiverMoEModel(tiny_config("token"))
    model.save_pretrained(tmp_path)
    eager = AutoModel.from_pretrained(tmp_path, experts_implementation="eager")
    assert eager.config._experts_implementation == "eager"
    linear = next(m for m in eager.modules() if isinstance(m, UniPerceiverMoELinear))
    assert linear.implementation == "eager"
    eager.set_experts_implementation("grouped_mm")
    assert linear.implementation == "grouped_mm"
    with pytest.raises(ValueError, match="experts_implementation='batched_mm' is not supported"):
        eager.set_experts_implementation("batched_mm")


def test_merged_experts_equal_unmerged_experts():
    layer = UniPerceiverMoELinear(16, 12, 4)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(20, 16)
    keys = torch.tensor([0, 2, 1, 2, 0] * 4)
    groups = RouteGroups.from_keys(keys)
    gates = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 0.6, 0.4], [0.5, 0, 0, 0.5]])
    dispatch = MergedDispatch(gates, groups, None)
    expected = reference_moe_linear(layer, x, gates[groups.token_group])
    torch.testing.assert_close(layer(x, dispatch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["merged", "token"])
def test_expert_gradients_equal_the_per_expert_reference(path):
    layer = UniPerceiverMoELinear(16, 12, 4)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(20, 16, requires_grad=True)
    if path == "merged":
        groups = RouteGroups.from_keys(torch.tensor([0, 2, 1, 2, 0] * 4))
        gates = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 0.6, 0.4], [0.5, 0, 0, 0.5]])
        dispatch, per_token = MergedDispatch(gates, groups, None), gates[groups.token_group]
    else:
        logits = torch.randn(20, 4)
        weight, index = logits.softmax(-1).topk(2, dim=-1)
        decision = GateDecision(logits, index, weight / weight.sum(-1, keepdim=True))
        dispatch, per_token = build_token_dispatch(decision, 4, capacity=None), decision.dense_weights(4)
    upstream = torch.randn(20, 12)
    ours = torch.autograd.grad((layer(x, dispatch) * upstream).sum(), (x, layer.weight, layer.bias))
    ref = torch.autograd.grad((reference_moe_linear(layer, x, per_token) * upstream).sum(), (x, layer.weight, layer.bias))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_gemm_equals_one_gemm_per_group(grouped_mm, monkeypatch):
    from modeling_uniperceiver_moe import moe_implementations

    if not grouped_mm:  # the per-group fallback used where grouped_mm has no kernel (e.g. CUDA fp32)
        monkeypatch.setattr(moe_implementations, "_grouped_mm_supported", lambda x, out_features: False)
    x = torch.randn(11, 8)
    weight = torch.randn(3, 8, 8)  # widths keep grouped_mm's 16-byte stride rule, in the backward too
    offsets = torch.tensor([4, 4, 11], dtype=torch.int32)  # an empty middle group
    rows = torch.tensor([0] * 4 + [2] * 7)
    bias = torch.randn(3, 8)
    x.requires_grad_(True)
    bias.requires_grad_(True)
    got = grouped_linear(x, weight, offsets, bias, rows, one_hot_rows(rows, 3, torch.float32))
    expected = torch.cat([x[:4] @ weight[0].t() + bias[0], x[4:] @ weight[2].t() + bias[2]])
    torch.testing.assert_close(got, expected)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (x, bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, bias))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_token_dispatch_equals_a_per_expert_loop():
    layer = UniPerceiverMoELinear(16, 8, 4)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(30, 16)
    logits = torch.randn(30, 4)
    weight, index = logits.softmax(-1).topk(2, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    decision = GateDecision(logits, index, weight)
    dispatch = build_token_dispatch(decision, 4, capacity=None)
    dense_gates = decision.dense_weights(4)
    torch.testing.assert_close(layer(x, dispatch), reference_moe_linear(layer, x, dense_gates), rtol=1e-5, atol=1e-5)


def test_capacity_drops_late_assignments_first_choices_win():
    logits = torch.tensor([[5.0, 0.0, -5.0]] * 6)  # everyone prefers expert 0, then 1
    weight, index = logits.softmax(-1).topk(2, dim=-1)
    dispatch = build_token_dispatch(GateDecision(logits, index, weight), 3, capacity=4)
    kept = dispatch.weight > 0
    per_expert = torch.bincount(dispatch.expert_index[kept], minlength=3)
    assert per_expert.tolist() == [4, 4, 0]
    # expert 0 keeps the first four tokens' first choices
    assert sorted(dispatch.token_index[kept & (dispatch.expert_index == 0)].tolist()) == [0, 1, 2, 3]
    assert dispatch.dropped_fraction.item() == pytest.approx(4 / 12)


@pytest.mark.parametrize("rows,groups", [(200, 3), (200, 64), (200, 65), (0, 4), (1, 1)])
def test_stable_group_order_equals_a_stable_argsort(rows, groups, monkeypatch):
    """Counting sort up to MAX_COUNTING_SORT_GROUPS (64), comparison sort above (and under the benchmark's
    `-argsort` ablation): both the stable order."""
    from benchmarks.bench_moe import argsort_dispatch

    group = torch.randint(0, groups, (rows,), generator=torch.Generator().manual_seed(groups))
    expected = torch.argsort(group, stable=True)
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: sorts.append(1) or argsort(*a, **k))
    order, inverse, counts = stable_group_order(group, groups)
    assert len(sorts) == (groups > 64)
    with argsort_dispatch():
        ablated = stable_group_order(group, groups)
    assert len(sorts) == (groups > 64) + 1
    for result in (order, inverse, counts), ablated:
        assert torch.equal(result[0], expected)
        assert torch.equal(result[1][expected], torch.arange(rows))
        assert torch.equal(result[2], torch.bincount(group, minlength=groups))


def _argsort_token_dispatch(decision, num_experts: int, capacity: int | None) -> TokenDispatch:
    """Reference: the dispatch found by a stable comparison sort of the assignments' experts (what
    `routing.build_token_dispatch`'s counting sort must equal)."""
    num_tokens, top_k = decision.expert_index.shape
    flat_expert = decision.expert_index.t().reshape(-1)
    flat_weight = decision.expert_weight.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_expert.device).scatter_add_(
        0, flat_expert, torch.ones_like(flat_expert))
    offsets = torch.cumsum(counts, 0)
    sorted_expert = flat_expert.index_select(0, order)
    sorted_weight = flat_weight.index_select(0, order)
    dropped = flat_weight.new_zeros(())
    if capacity is not None:
        rank = torch.arange(order.numel(), device=order.device) - (offsets - counts).index_select(0, sorted_expert)
        keep = rank < capacity
        sorted_weight = torch.where(keep, sorted_weight, torch.zeros_like(sorted_weight))
        dropped = 1.0 - keep.float().mean()
    inverse_order = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return TokenDispatch(order % num_tokens, sorted_expert, sorted_weight, offsets.to(torch.int32), decision,
                         dropped, order, inverse_order)



@pytest.mark.parametrize("tokens,top_k,experts,capacity", [(50, 2, 4, None), (50, 2, 4, 20), (37, 1, 8, 3), (1, 2, 3, None), (0, 1, 4, 2)])
def test_counting_sort_dispatch_equals_a_stable_argsort(tokens, top_k, experts, capacity):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    logits[: tokens // 2, 0] += 4  # crowd expert 0 so a capacity drops some
    weight, index = logits.softmax(-1).topk(top_k, dim=-1)
    decision = GateDecision(logits, index, weight / weight.sum(-1, keepdim=True))
    ours, reference = build_token_dispatch(decision, experts, capacity), _argsort_token_dispatch(decision, experts, capacity)
    for name in ("token_index", "expert_index", "weight", "offsets", "order", "inverse_order"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name
    if tokens:
        assert torch.equal(ours.dropped_fraction, reference.dropped_fraction)
    else:  # the argsort version divided 0 by 0
        assert ours.dropped_fraction == 0
    if capacity is not None and tokens > 10:
        assert ours.dropped_fraction > 0


def test_balance_loss_is_one_for_a_uniform_router_and_higher_when_collapsed():
    uniform = torch.zeros(8, 4)
    index = torch.arange(8)[:, None] % 4
    assert load_balancing_loss(GateDecision(uniform, index, torch.ones(8, 1)), 4).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[10.0, 0, 0, 0]] * 8)
    loss = load_balancing_loss(GateDecision(collapsed, torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1)), 4)
    assert loss.item() > 3.9


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("caption_mode", [False, True])
@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_sdpa_equals_eager(routing, caption_mode):
    config = tiny_config(routing)
    config._attn_implementation = "sdpa"
    model = UniPerceiverMoEModel(config).eval()
    batch = make_batch()
    sdpa = model(**batch, caption_mode=caption_mode).last_hidden_state
    model.config._attn_implementation = "eager"
    eager = model(**batch, caption_mode=caption_mode).last_hidden_state
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_caption_pattern_layout():
    allowed = caption_attention_pattern(num_prefix=2, num_words=3)
    w, q = [2, 3, 4], [5, 6, 7]
    assert allowed[:2, :2].all() and not allowed[:2, 2:].any()  # prefix sees only the prefix
    assert allowed[w[1], w[0]] and allowed[w[1], w[1]] and not allowed[w[1], w[2]]
    assert allowed[q[1], w[0]] and not allowed[q[1], w[1]] and allowed[q[1], q[1]] and not allowed[q[1], q[0]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_caption_mask_hides_future_words(attention):
    config = tiny_config("attribute")
    config._attn_implementation = attention
    model = UniPerceiverMoEModel(config).eval()
    batch = make_batch(pad=False)
    t = 2
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, t + 1] = (changed["input_ids"][:, t + 1] + 17) % 49408
    a = model(**batch, caption_mode=True)
    b = model(**changed, caption_mode=True)
    start, words = a.text_start, batch["input_ids"].shape[1]
    # words w_0..w_t and queries q_0..q_{t+1} (q_{t+1} predicts w_{t+1}, it sees w_<=t only) are unchanged
    unchanged = list(range(start + t + 1)) + list(range(start + words, start + words + t + 2))
    torch.testing.assert_close(a.last_hidden_state[:, unchanged], b.last_hidden_state[:, unchanged], rtol=0, atol=1e-6)
    # ... and the change is visible to w_{t+1} itself (the test can fail)
    assert not torch.allclose(a.last_hidden_state[:, start + t + 1], b.last_hidden_state[:, start + t + 1])


def test_padding_does_not_change_real_tokens():
    model = encoder("attribute")
    batch = make_batch(pad=False)
    padded = dict(batch)
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((3, 2), 7)], dim=1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(3, 2, dtype=torch.long)], dim=1)
    a = model(**batch).last_hidden_state
    b = model(**padded).last_hidden_state[:, : a.shape[1]]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_out_of_range_indices_are_named_and_the_checks_that_read_tensors_can_be_turned_off():
    """Text longer than the position table (checked from the shape), given positions beyond it, query
    positions beyond the text and labels beyond the candidates are ValueErrors naming the value;
    `check_input_values = False` skips the two checks that read a tensor (the trainer's batches are in
    range by construction)."""
    model = UniPerceiverMoEForGenericPerception(tiny_config("none", max_position_embeddings=8)).eval()
    inputs = make_batch(batch=2, words=5)
    targets = {"target_input_ids": inputs["input_ids"][:, :3], "target_attention_mask": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="text positions reach 8, max_position_embeddings=8"):
        model(**make_batch(batch=2, words=9), **targets)
    with pytest.raises(ValueError, match="text positions reach 9, max_position_embeddings=8"):
        model(**inputs, position_ids=torch.arange(5).expand(2, 5) + 5, **targets)
    with pytest.raises(ValueError, match="query_positions reach 5, beyond the text length"):
        model(**inputs, query_positions=torch.tensor([[0, 5], [1, -1]]), **targets)
    with pytest.raises(ValueError, match="a label is 2 but there are only 2 candidates"):
        model(**inputs, labels=torch.tensor([0, 2]), **targets)
    model.check_input_values = False
    assert torch.isfinite(model(**inputs, labels=torch.tensor([0, 1]), **targets).loss)
    with pytest.raises(IndexError):  # unchecked: the loss itself fails, without the model's message
        model(**inputs, labels=torch.tensor([0, 2]), **targets)


# ------------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("routing", ROUTINGS)
def test_batch_order_invariance(routing):
    model = encoder(routing)
    batch = make_batch(batch=4)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = {k: v[perm] for k, v in batch.items()}
    a = model(**batch).last_hidden_state
    b = model(**permuted).last_hidden_state
    torch.testing.assert_close(a[perm], b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["attribute", "task", "modality"])
def test_folded_model_matches_moe_model_and_reloads(routing, tmp_path):
    model = UniPerceiverMoEModel(tiny_config(routing)).eval()
    for p in model.parameters():  # make experts differ strongly so that a wrong merge shows
        torch.nn.init.normal_(p, std=0.2)
    batch = make_batch()
    routes = {
        "attribute": batch["attribute_vectors"].unique(dim=0),
        "task": batch["task_ids"].unique(),
        "modality": torch.tensor([0, 1]),
    }[routing]
    expected = model(**batch).last_hidden_state
    folded = fold_experts(model, routes)
    assert (expected - folded(**batch).last_hidden_state).abs().max().item() < 1e-5
    assert not any(".router." in k for k in folded.state_dict())
    folded.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(folded(**batch).last_hidden_state, reloaded(**batch).last_hidden_state)


def test_single_route_fold_is_a_plain_dense_linear():
    model = encoder("attribute")
    batch = make_batch()
    one = batch["attribute_vectors"][:1]
    folded = fold_experts(model, one)
    linear = folded.encoder.layers[0].mlp.fc1
    assert linear.weight.shape[0] == 1
    only_first = {k: v[:1] for k, v in batch.items()}
    torch.testing.assert_close(folded(**only_first).last_hidden_state, model(**only_first).last_hidden_state, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not folded"):
        folded(**batch)


def test_fold_rejects_data_dependent_routing():
    with pytest.raises(ValueError, match="token"):
        fold_experts(encoder("token"), [[0.0] * 8])


# ------------------------------------------------------------------------------------------ training
def classification_step_inputs():
    batch = make_batch(batch=6, with_image=True)
    classes = make_batch(batch=3, seed=5, with_image=False, pad=False)
    return dict(
        pixel_values=batch["pixel_values"], attribute_vectors=batch["attribute_vectors"], task_ids=batch["task_ids"],
        target_input_ids=classes["input_ids"], target_attribute_vectors=classes["attribute_vectors"],
        target_task_ids=classes["task_ids"], labels=torch.tensor([0, 1, 2, 0, 1, 2]), task_family="image_classification",
    )


@pytest.mark.parametrize("routing", ROUTINGS)
def test_each_routing_trains_and_the_loss_falls(routing):
    # LayerScale 1 instead of 1e-3 and no router noise: with the reference's init (1e-3, noise 1/E that
    # re-draws the experts every step while gate logits are small) a 2-layer model needs far more steps.
    config = tiny_config(routing, layer_scale_init=1.0, moe_router_noise_std=0.0)
    model = UniPerceiverMoEForGenericPerception(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = classification_step_inputs()
    losses = []
    for _ in range(30):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] - 0.1, losses
    if routing in ("token", "context"):
        assert model(**inputs).aux_loss.item() > 0


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("routing", ["none", "attribute", "task", "modality", "token", "context"])
def test_gradient_checkpointing_gives_the_same_gradients(routing, use_reentrant):
    """Both torch checkpointing modes: the once-per-step expert merge outside the layers is differentiated
    once, and the token routers' aux loss gets its gradient."""
    config = tiny_config(routing, drop_path_rate=0.1)
    inputs = classification_step_inputs()

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = UniPerceiverMoEForGenericPerception(config).train()
        if checkpointing:
            model.checkpoint_activations(use_reentrant=use_reentrant)
        calls = []
        model.uniperceiver.encoder.layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))
        torch.manual_seed(1)  # same router noise and drop-path draws
        model(**inputs).loss.backward()
        # two encodings (inputs, targets); a checkpointed layer runs its forward again in backward
        assert len(calls) == (4 if checkpointing else 2)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=0, atol=0, msg=name)


def test_only_chosen_experts_get_gradients_with_attribute_routing():
    config = tiny_config("attribute", moe_router_noise_std=0.0, moe_top_k=1)
    model = UniPerceiverMoEModel(config).train()
    batch = make_batch()
    batch["attribute_vectors"] = batch["attribute_vectors"][:1].expand(3, -1)  # one route
    out = model(**batch, output_router_logits=True)
    out.last_hidden_state.sum().backward()
    chosen = out.router_indices[0][0, 0, 0].item()
    grad = model.encoder.layers[0].attention.qkv.weight.grad
    used = grad.abs().sum(dim=(1, 2)) > 0
    assert used.tolist() == [e == chosen for e in range(config.moe_num_experts)]


# ------------------------------------------------------------------------------------------ outputs
def test_outputs_hidden_states_attentions_and_router_logits():
    model = encoder("token")
    out = model(**make_batch(), output_hidden_states=True, output_attentions=True, output_router_logits=True)
    batch, length = out.last_hidden_state.shape[:2]
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (batch, 2, length, length)
    assert len(out.router_logits) == 4  # 2 layers x (attention, FFN) decisions
    assert out.router_logits[0].shape == (batch, length, 4) and out.router_indices[0].shape == (batch, length, 2)
    weights = out.router_weights[0]  # top-2: the two chosen experts' softmax probabilities, renormalised
    chosen = out.router_logits[0].softmax(-1).gather(-1, out.router_indices[0])
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert isinstance(model(**make_batch(), return_dict=False), tuple)


def test_video_input_uses_temporal_slots():
    model = encoder("modality")
    video = torch.randn(2, 3, 3, 16, 16)
    out = model(pixel_values=video, output_router_logits=True)
    assert out.last_hidden_state.shape == (2, 1 + 3 * 4, 32)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda b: b.update(pixel_values=torch.randn(3, 3, 20, 16)), "patch_size"),
        (lambda b: b.update(pixel_values=torch.randn(3, 1, 16, 16)), "channels"),
        (lambda b: b.update(pixel_values=torch.randn(3, 9, 3, 16, 16)), "frames"),
        (lambda b: b.pop("attribute_vectors"), "attribute_vectors"),
        (lambda b: b.update(attribute_vectors=torch.zeros(3, 7)), "attribute_vectors"),
        (lambda b: b.update(attention_mask=torch.ones(3, 4)), "attention_mask"),
        (lambda b: b.update(input_ids=torch.full((3, 5), 60000)), "vocab_size"),
        (lambda b: b.update(pixel_values=torch.randn(2, 3, 16, 16)), "batch sizes"),
    ],
)
def test_mismatched_inputs_raise_clear_errors(change, message):
    batch = make_batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        encoder("attribute")(**batch)


def test_task_ids_out_of_range_and_unknown_family_raise():
    batch = make_batch()
    batch["task_ids"] = torch.tensor([0, 1, 9])
    with pytest.raises(ValueError, match="task ids"):
        encoder("task")(**batch)
    head = UniPerceiverMoEForGenericPerception(tiny_config("none")).eval()
    inputs = classification_step_inputs()
    inputs["task_family"] = "speech"
    with pytest.raises(ValueError, match="unknown task family"):
        head(**inputs)
    inputs.update(task_family="image_classification", labels=torch.tensor([0, 1, 2, 0, 1, 5]))
    with pytest.raises(ValueError, match="candidates"):
        head(**inputs)


def test_expert_merge_backward_matches_autograd_including_gate_gradients():
    from modeling_uniperceiver_moe.moe_implementations import _chunked_row_products, _MergeExperts

    gates = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    experts = torch.randn(5, 256, dtype=torch.float64, requires_grad=True)  # 256 = 4 chunks of 64
    assert torch.autograd.gradcheck(lambda g, w: _MergeExperts.apply(g, w, torch.float64), (gates, experts))
    a, b = torch.randn(3, 4096, dtype=torch.float64), torch.randn(5, 4096, dtype=torch.float64)
    torch.testing.assert_close(_chunked_row_products(a, b), a @ b.t())


def test_merged_path_outputs_and_all_gradients_equal_the_reference():
    layer = UniPerceiverMoELinear(16, 12, 4)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(20, 16, requires_grad=True)
    groups = RouteGroups.from_keys(torch.tensor([0, 2, 1, 2, 0] * 4))
    gates = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 0.6, 0.4], [0.5, 0, 0, 0.5]], requires_grad=True)
    out = layer(x, MergedDispatch(gates, groups, None))
    ref = reference_moe_linear(layer, x, gates[groups.token_group])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    ours = torch.autograd.grad((out * upstream).sum(), (x, gates, layer.weight, layer.bias))
    theirs = torch.autograd.grad((ref * upstream).sum(), (x, gates, layer.weight, layer.bias))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("routing", ["none", "token", "context", "modality", "task", "attribute"])
def test_a_bfloat16_model_runs_inference_close_to_float32(routing):
    """As after `from_pretrained(..., dtype=torch.bfloat16)`: the float32 routers cast their bf16
    parameters themselves (the attribute router's LayerNorm used to fail on mixed dtypes). With token or
    context routing a token whose top-k is a near-tie may choose another expert in bf16, which by design
    changes its keys and values and so every token of its sequence: such sequences (a few tokens, asserted)
    are left out of the comparison, every other sequence must agree."""
    torch.manual_seed(0)
    model = UniPerceiverMoEModel(tiny_config(routing)).eval()
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch, output_router_logits=True)
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.to(torch.bfloat16)(**batch, output_router_logits=True)
    assert out.last_hidden_state.dtype == torch.bfloat16
    close = torch.isclose(out.last_hidden_state.float(), reference.last_hidden_state, rtol=0.05, atol=0.05)
    compared = torch.ones(close.shape[0], dtype=torch.bool)
    if routing in ("token", "context"):
        flips = torch.stack([(ours.sort(-1).values != theirs.sort(-1).values).any(-1)
                             for ours, theirs in zip(out.router_indices, reference.router_indices)])  # [D, B, L]
        assert flips.float().mean() <= 0.05, flips
        compared = ~flips.any(0).any(-1)
        assert compared.any(), compared
    assert close[compared].all()


@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_top1_router_learns_from_the_task_loss(routing):
    """Top-1 keeps the chosen expert's probability as its weight (Switch): renormalised it would be 1 and
    the router would get no gradient from the task loss (attribute routing has no auxiliary loss)."""
    config = tiny_config(routing, moe_router_noise_std=0.0, moe_top_k=1, moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0)
    model = UniPerceiverMoEModel(config).train()
    out = model(**make_batch(), output_router_logits=True)
    probs = out.router_logits[0].softmax(-1)
    (out.last_hidden_state ** 2).sum().backward()
    gate = model.encoder.layers[0].attn_gate.router
    grads = [p.grad for p in gate.parameters() if p.grad is not None]
    assert grads and max(g.abs().max().item() for g in grads) > 1e-4
    # the weight is the winner's probability, strictly below 1 for a non-degenerate router
    decision = select_top_k(out.router_logits[0].reshape(-1, config.moe_num_experts), 1, 0.0, False)
    torch.testing.assert_close(decision.expert_weight[:, 0], probs.reshape(-1, config.moe_num_experts).max(-1).values)
    assert bool((decision.expert_weight < 1).all())


@pytest.mark.parametrize("routing", ["attribute", "task", "modality"])
def test_a_data_independent_gate_moves_its_logits_by_many_learning_rates_per_update(routing):
    """Task and modality gates embed their id like the attribute gate embeds its vector (embedding, norm,
    projection), so one AdamW update moves a logit by a sum over the width. A table of logits moves by one
    learning rate per update: within a run it never outgrows the training noise (std 1 / experts), which
    then draws the experts at every step."""
    config = tiny_config(routing)
    router = next(m.router for m in UniPerceiverMoEModel(config).modules() if hasattr(m, "router"))  # as initialised
    key = torch.ones(1, config.attribute_dim) if routing == "attribute" else torch.zeros(1, dtype=torch.long)
    optimizer = torch.optim.AdamW(router.parameters(), lr=1e-3, weight_decay=0.0)
    before = router(key)[0, 0].item()
    (-router(key)[0, 0]).backward()
    optimizer.step()
    assert router(key)[0, 0].item() - before > 10 * 1e-3


@pytest.mark.parametrize("routing", ["attribute", "task", "modality"])
def test_route_balance_loss_trains_data_independent_gates_only_when_asked(routing):
    """`moe_route_balance_coef` adds the Switch balance loss of the route groups' decisions, each token counted
    once, in training: the aux loss is that coefficient times the balance loss of the tokens' decisions, and its
    gradient reaches the routers; off by default (the reference) and in evaluation."""
    batch = make_batch()
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # every token real
    torch.manual_seed(0)
    config = tiny_config(routing, moe_route_balance_coef=0.5, moe_router_noise_std=0.0)
    model = UniPerceiverMoEModel(config).train()
    out = model(**batch, output_router_logits=True)
    experts = config.moe_num_experts
    expected = sum(0.5 * load_balancing_loss(select_top_k(logits.reshape(-1, experts), config.moe_top_k, 0.0, False),
                                             experts) for logits in out.router_logits)  # one term per gate
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and any(p.grad is not None and p.grad.abs().max() > 0 for p in routers)
    assert model.eval()(**batch).aux_loss.item() == 0
    torch.manual_seed(0)
    assert UniPerceiverMoEModel(tiny_config(routing)).train()(**batch).aux_loss.item() == 0


# ------------------------------------------------------------------------------------------ losses
def test_label_smoothing_is_the_reference_s_per_task_family_unless_the_config_sets_it():
    config = tiny_config()
    assert [config.label_smoothing_for(f) for f in ("image_classification", "video_classification", "mlm",
                                                     "captioning", "retrieval", "text_classification")] == \
        [0.1, 0.1, 0.0, 0.0, 0.1, 0.1]
    assert config.label_smoothing_for(config.task_families.index("mlm")) == 0.0  # a family index
    assert tiny_config(label_smoothing=0.2).label_smoothing_for("mlm") == 0.2  # one value for every family
    partly = tiny_config(label_smoothing={"captioning": 0.05})
    assert (partly.label_smoothing_for("captioning"), partly.label_smoothing_for("retrieval")) == (0.05, 0.1)
    with pytest.raises(ValueError, match=r"label_smoothing: unknown task family 'vqa'"):
        tiny_config(label_smoothing={"vqa": 0.1})
    with pytest.raises(ValueError, match=r"label_smoothing: mlm: must be a number in \[0, 1\)"):
        tiny_config(label_smoothing={"mlm": 1.5})


def test_losses_are_the_reference_s_plain_ce_for_words_and_both_retrieval_directions_summed():
    """MLM and captioning: plain cross-entropy; classification: smoothed by 0.1; retrieval: the smoothed
    input->target plus the smoothed target->input cross-entropy, as the reference's i2t and t2i terms."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(moe_router_noise_std=0.0)).eval()
    batch = head_step_batch()
    for family, smoothing in (("mlm", 0.0), ("captioning", 0.0), ("image_classification", 0.1)):
        out = model(**batch, task_family=family)
        expected = F.cross_entropy(out.logits, batch["labels"], label_smoothing=smoothing) + out.aux_loss
        torch.testing.assert_close(out.loss, expected)
    pairs = make_batch(batch=3)
    pairs.update(target_input_ids=torch.randint(0, 49408, (3, 3)), labels=torch.arange(3),
                 target_attribute_vectors=torch.tensor([[0.0, 1, 0, 1, 0, 1, 1, 0]]).expand(3, 8),
                 target_task_ids=torch.full((3,), 3))
    out = model(**pairs, task_family="retrieval", symmetric_loss=True)
    expected = (F.cross_entropy(out.logits, pairs["labels"], label_smoothing=0.1)
                + F.cross_entropy(out.logits.t(), pairs["labels"], label_smoothing=0.1) + out.aux_loss)
    torch.testing.assert_close(out.loss, expected)


def test_a_shared_projection_head_projects_inputs_and_candidates_alike(tmp_path):
    """`share_projection_head`: the reference's one ln_post + proj, no second head in the weights."""
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(share_projection_head=True, moe_router_noise_std=0.0)).eval()
    assert model.target_head is None and model.candidate_head is model.input_head
    assert not any(key.startswith("target_head.") for key in model.state_dict())
    batch = head_step_batch()
    with torch.no_grad():
        features, _, out = model.encode_targets(input_ids=batch["target_input_ids"],
                                                attribute_vectors=batch["target_attribute_vectors"],
                                                task_ids=batch["target_task_ids"], return_outputs=True)
        torch.testing.assert_close(features, model.input_head(out.pooler_output))
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path).eval()
    assert loaded.config.share_projection_head and loaded.target_head is None
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)


def test_the_word_bias_adds_the_family_bias_of_each_candidate_word(tmp_path):
    """`candidate_token_ids` adds `word_bias[family, token]` to each candidate's logit (and to the loss); a model
    without `word_logit_bias` has no such weights and ignores the ids; the bias survives save and load."""
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(moe_router_noise_std=0.0)).eval()
    assert not model.word_bias.bias.any()  # zero at init: changes nothing until trained or started
    with torch.no_grad():
        model.word_bias.bias.normal_()
    batch = head_step_batch()
    words = batch["target_input_ids"][:, 0]
    with torch.no_grad():
        plain = model(**batch, task_family="mlm")
        biased = model(**batch, task_family="mlm", candidate_token_ids=words)
    row = model.word_bias.bias[model.config.task_families.index("mlm")]
    torch.testing.assert_close(biased.logits, plain.logits + row[words], rtol=0, atol=1e-5)
    assert not torch.allclose(biased.loss, plain.loss)
    with pytest.raises(ValueError, match="one id per candidate"):
        model(**batch, candidate_token_ids=words[:2])
    model.save_pretrained(tmp_path)
    loaded = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch, task_family="mlm", candidate_token_ids=words).logits, biased.logits)
    without = UniPerceiverMoEForGenericPerception(tiny_config(moe_router_noise_std=0.0, word_logit_bias=False)).eval()
    assert without.word_bias is None and not any("word_bias" in key for key in without.state_dict())
    with torch.no_grad():
        assert torch.equal(without(**batch, candidate_token_ids=words).logits, without(**batch).logits)


def test_a_random_first_temporal_slot_in_training_only_as_the_reference():
    """`random_temporal_offset`: an image (one frame) takes a random temporal slot per training batch, the
    same slot for the whole batch; evaluation and the default use slot 0."""
    torch.manual_seed(0)
    config = tiny_config(random_temporal_offset=True)
    embeddings = UniPerceiverMoEModel(config).embeddings
    slots = embeddings.temporal_embeddings.weight
    pixels = torch.randn(2, 3, 16, 16)

    embeddings.eval()
    reference_tokens, _ = embeddings.embed_vision(pixels)
    embeddings.train()
    seen = set()
    for _ in range(40):
        tokens, _ = embeddings.embed_vision(pixels)
        shift = tokens - reference_tokens  # slot f - slot 0, the same for every token of the batch
        matches = [f for f in range(config.num_frames)
                   if torch.allclose(shift, (slots[f] - slots[0]).expand_as(shift), atol=1e-6)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(config.num_frames))
    embeddings.eval()
    torch.testing.assert_close(embeddings.embed_vision(pixels)[0], reference_tokens)
    default = UniPerceiverMoEModel(tiny_config()).embeddings.train()
    default.load_state_dict(embeddings.state_dict())
    torch.testing.assert_close(default.embed_vision(pixels)[0], reference_tokens)


def test_text_distance_bias_is_alibi_between_text_tokens_only():
    """Half the heads local (slopes 1, 1/2, ...), the rest global; -slope * |p_i - p_j| between text tokens,
    0 wherever the SPE or a patch is the query or the key."""
    torch.testing.assert_close(text_distance_slopes(3), torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(text_distance_slopes(12)[:7], torch.tensor([1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 0]))
    positions = torch.tensor([[0, 1, 2, 4]])
    bias = text_distance_bias(positions, num_heads=2, length=7, text_start=3, dtype=torch.float32)
    assert bias.shape == (1, 2, 7, 7)
    assert not bias[:, :, :3].any() and not bias[:, :, :, :3].any()
    expected = -(positions[0, :, None] - positions[0, None, :]).abs().float()
    torch.testing.assert_close(bias[0, 0, 3:, 3:], expected)
    assert not bias[0, 1].any()


def test_text_distance_bias_changes_text_inputs_and_leaves_images_alone():
    torch.manual_seed(0)
    with_bias = UniPerceiverMoEModel(tiny_config("attribute", text_distance_bias="alibi")).eval()
    without = UniPerceiverMoEModel(tiny_config("attribute", text_distance_bias="none")).eval()
    without.load_state_dict(with_bias.state_dict())
    batch = make_batch()
    with torch.no_grad():
        image_only = {key: batch[key] for key in ("pixel_values", "attribute_vectors", "task_ids")}
        torch.testing.assert_close(with_bias(**image_only).last_hidden_state, without(**image_only).last_hidden_state,
                                   rtol=0, atol=0)
        assert not torch.allclose(with_bias(**batch).last_hidden_state, without(**batch).last_hidden_state,
                                  atol=1e-3)
    with pytest.raises(ValueError, match="text_distance_bias"):
        tiny_config(text_distance_bias="rope")
