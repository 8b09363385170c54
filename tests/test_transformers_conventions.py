"""The conventions transformers' own models follow: output flags from the config, tuple/dict outputs,
standard MoE config names, attention backends, weight dtypes and embedding resizing."""

import pytest
import torch

from modeling_uniperceiver_moe import UniPerceiverMoEConfig, UniPerceiverMoEForGenericPerception, UniPerceiverMoEModel
from tests.conftest import TEXT_INPUT, make_batch, tiny_config

ROUTINGS = ["none", "attribute", "token"]


def head_batch(seed=0) -> dict:
    """Inputs (`make_batch`) and four text candidates with their route inputs."""
    g = torch.Generator().manual_seed(seed + 1)
    batch = make_batch(seed=seed)
    mask = torch.ones(4, 3, dtype=torch.long)
    mask[1, -1] = 0
    batch.update(target_input_ids=torch.randint(0, 49408, (4, 3), generator=g), target_attention_mask=mask,
                 target_attribute_vectors=TEXT_INPUT.to_tensor().expand(4, -1).clone(),
                 target_task_ids=torch.full((4,), 3), labels=torch.tensor([0, 2, 1]))
    return batch


def build(cls, routing, **config_overrides):
    torch.manual_seed(0)
    return cls(tiny_config(routing, **config_overrides)).eval()


def flatten(value) -> list:
    """Every tensor of a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten(item)]
    if hasattr(value, "to_tuple"):
        return flatten(value.to_tuple())
    return []


# ------------------------------------------------------------------------------------------ output flags
@pytest.mark.parametrize("routing", ROUTINGS)
def test_base_model_takes_unset_flags_from_the_config(routing):
    model = build(UniPerceiverMoEModel, routing, output_attentions=True, output_hidden_states=True,
                  output_router_logits=routing != "none")
    out = model(**make_batch())
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert (out.router_logits is not None) == (routing != "none")
    assert model(**make_batch(), output_attentions=False).attentions is None  # an explicit value wins
    model.config.return_dict = False
    assert isinstance(model(**make_batch()), tuple)
    assert not isinstance(model(**make_batch(), return_dict=True), tuple)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_head_returns_hidden_states_and_attentions_of_both_passes(routing):
    model = build(UniPerceiverMoEForGenericPerception, routing)
    out = model(**head_batch(), output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert len(out.target_hidden_states) == 3 and len(out.target_attentions) == 2
    assert out.attentions[0].shape[0] == 3 and out.target_attentions[0].shape[0] == 4
    assert torch.equal(out.hidden_states[-1], out.input_outputs.last_hidden_state)
    plain = model(**head_batch())
    assert plain.hidden_states is plain.attentions is plain.target_attentions is None
    model.config.output_hidden_states = True
    assert model(**head_batch()).target_hidden_states is not None


@pytest.mark.parametrize("routing", ROUTINGS)
def test_head_outputs_equal_with_sdpa_and_eager_attention(routing):
    model = build(UniPerceiverMoEForGenericPerception, routing)
    model.config._attn_implementation = "sdpa"
    sdpa = model(**head_batch(), output_hidden_states=True)
    model.config._attn_implementation = "eager"
    eager = model(**head_batch(), output_hidden_states=True)
    for name in ("logits", "loss", "input_features", "target_features"):
        torch.testing.assert_close(getattr(sdpa, name), getattr(eager, name), rtol=1e-5, atol=1e-5)
    for a, b in zip(sdpa.target_hidden_states, eager.target_hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [UniPerceiverMoEModel, UniPerceiverMoEForGenericPerception])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_tuple_and_dict_outputs_hold_the_same_numeric_tensors(cls, routing):
    model = build(cls, routing)
    inputs = make_batch() if cls is UniPerceiverMoEModel else head_batch()
    flags = dict(output_attentions=True, output_hidden_states=True)
    as_dict = model(**inputs, **flags)
    as_tuple = model(**inputs, **flags, return_dict=False)
    dict_tensors, tuple_tensors = flatten(as_dict), flatten(as_tuple)
    assert len(dict_tensors) == len(tuple_tensors) > 0
    for a, b in zip(dict_tensors, tuple_tensors):
        assert a.dtype != torch.bool  # every field is numeric: allclose-style comparisons work on all
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ config
def test_standard_moe_names_read_and_write_ours():
    config = tiny_config("token")
    assert (config.num_experts, config.num_experts_per_tok, config.router_aux_loss_coef) == (4, 2, 0.01)
    assert config.num_local_experts == 4
    config = UniPerceiverMoEConfig(**{**tiny_config("token").to_dict(), "num_experts_per_tok": 1})
    assert config.moe_top_k == 1
    assert not config.output_router_logits


def test_no_attention_backend_is_claimed_that_forward_does_not_pass_through():
    assert not getattr(UniPerceiverMoEModel, "_supports_attention_backend", False)


# ------------------------------------------------------------------------------------------ weights
def test_embeddings_cannot_be_resized_below_the_special_tokens():
    model = build(UniPerceiverMoEForGenericPerception, "attribute")
    with pytest.raises(ValueError, match=r"would drop the special tokens .* keep at least 49411"):
        model.resize_token_embeddings(1000)
    model.resize_token_embeddings(49420)
    assert model.config.vocab_size == 49420 and torch.isfinite(model(**head_batch()).loss)


@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_routers_stay_float32_when_loaded_in_bfloat16(routing, tmp_path):
    build(UniPerceiverMoEForGenericPerception, routing).save_pretrained(tmp_path)
    model = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".router." in n} == {torch.float32}
    assert dtypes["uniperceiver.embeddings.word_embeddings.weight"] == torch.bfloat16
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in head_batch().items()}
    assert torch.isfinite(model(**batch).logits).all()


# ------------------------------------------------------------------------------------------ deprecations
def test_enabling_activation_checkpointing_uses_no_deprecated_api():
    import warnings

    model = build(UniPerceiverMoEForGenericPerception, "attribute")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning of a name about to be removed fails here
        model.checkpoint_activations()
    assert any(getattr(layer, "gradient_checkpointing", False) for layer in model.uniperceiver.encoder.layers)


def test_the_test_configuration_hides_no_whole_warning_category():
    import configparser
    import os

    config = configparser.ConfigParser()
    config.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pytest.ini"))
    filters = [line.strip() for line in config["pytest"].get("filterwarnings", "").splitlines() if line.strip()]
    assert all(len(f.split(":")) >= 3 and f.split(":")[1] for f in filters), filters  # each names its message


# ------------------------------------------------------------------------------------------ inputs_embeds
@pytest.mark.parametrize("caption_mode", [False, True])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_inputs_embeds_give_the_outputs_of_the_ids_they_embed(routing, caption_mode):
    model = build(UniPerceiverMoEModel, routing)
    batch = make_batch()
    by_ids = model(**batch, caption_mode=caption_mode).last_hidden_state
    ids = batch.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    by_embeds = model(**batch, inputs_embeds=embeds, caption_mode=caption_mode).last_hidden_state
    assert torch.equal(by_ids, by_embeds)
    with pytest.raises(ValueError, match="not both"):
        model(**batch, input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(**batch, inputs_embeds=embeds[..., :5])


# ------------------------------------------------------------------------------------------ odd widths
@pytest.mark.parametrize("dtype, widths", [(torch.float32, {"intermediate_size": 37}),
                                           (torch.bfloat16, {"hidden_size": 36, "num_attention_heads": 2}),
                                           (torch.float32, {"hidden_size": 20, "num_attention_heads": 2})])
@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_moe_layers_of_widths_grouped_gemm_cannot_stride_run_and_train(routing, dtype, widths):
    """grouped_mm needs rows of a multiple of 16 bytes; other widths take the per-expert path and give the
    same outputs and gradients as the model with grouped_mm switched off everywhere."""
    from modeling_uniperceiver_moe import moe_implementations

    model = build(UniPerceiverMoEForGenericPerception, routing, **widths).to(dtype)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in head_batch().items()}

    def run():
        model.zero_grad()
        torch.manual_seed(0)
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    logits, grads = run()
    supported = moe_implementations._grouped_mm_supported
    moe_implementations._grouped_mm_supported = lambda x, out_features: False
    try:
        reference_logits, reference_grads = run()
    finally:
        moe_implementations._grouped_mm_supported = supported
    assert torch.isfinite(logits).all() and torch.equal(logits, reference_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))


# ------------------------------------------------------------------------------------------ offloading
LAYERS_ON_DISK = {"uniperceiver.embeddings": "cpu", "uniperceiver.encoder.layers.0": "disk",
                  "uniperceiver.encoder.layers.1": "disk", "input_head": "cpu", "target_head": "cpu",
                  "logit_scales": "cpu", "word_bias": "cpu"}


def offloaded(path, how: str):
    """The saved model at `path` with accelerate offloading its weights: to disk (all of it, or the layers),
    or to a CPU state dict (`accelerate.cpu_offload`); the parameters then wait on the meta device."""
    if how == "cpu":
        from accelerate import cpu_offload

        model = UniPerceiverMoEForGenericPerception.from_pretrained(path)
        cpu_offload(model, execution_device="cpu")
        return model.eval()
    device_map = {"": "disk"} if how == "disk" else LAYERS_ON_DISK
    return UniPerceiverMoEForGenericPerception.from_pretrained(path, device_map=device_map,
                                                              offload_folder=str(path / "offload")).eval()


@pytest.mark.parametrize("how", ["disk", "layers_on_disk", "cpu"])
@pytest.mark.parametrize("routing, overrides", [("none", {}), ("attribute", {}), ("token", {}),
                                                ("token", {"moe_top_k": 1}), ("task", {}), ("context", {})])
def test_offloaded_model_gives_the_in_memory_outputs(routing, overrides, how, tmp_path):
    """Every embedding, router and expert weight is read by calling its module, and with offloaded experts
    each gate decides and each expert linear merges inside its own call: no meta tensors, no unloaded gate
    weights. The encoder's states are equal; the head's logits equal up to float rounding (the in-memory head
    merges the experts of both passes in one GEMM, the offloaded one per pass)."""
    model = build(UniPerceiverMoEForGenericPerception, routing, **overrides)
    with torch.no_grad():
        model.word_bias.bias.normal_()  # a trained word bias, read through its offloaded module too
    model.save_pretrained(tmp_path)
    batch = head_batch()
    batch["candidate_token_ids"] = batch["target_input_ids"][:, 0]
    encoder_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "attribute_vectors",
                                            "task_ids")}
    with torch.no_grad():
        expected_states = model.uniperceiver(**encoder_inputs).last_hidden_state
        expected_logits = model(**batch).logits
        offloaded_model = offloaded(tmp_path, how)
        assert any(p.device.type == "meta" for p in offloaded_model.parameters())
        assert torch.equal(offloaded_model.uniperceiver(**encoder_inputs).last_hidden_state, expected_states)
        torch.testing.assert_close(offloaded_model(**batch).logits, expected_logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ dependencies
def test_the_model_needs_none_of_the_training_data_or_tuning_dependencies():
    """`pip install uniperceiver-moe` (no extras) is enough to load and run the model: importing it pulls in
    none of the packages the extras bring ([train], [data], [prompt], [hub])."""
    import subprocess
    import sys

    heavy = ("datasets", "peft", "matplotlib", "tensorboard", "evaluate", "av", "rdata", "sacrebleu")
    code = ("import sys, modeling_uniperceiver_moe\n"
            "from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception, UniPerceiverMoEProcessor\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr[-2000:]
    import importlib.metadata

    core = [r for r in importlib.metadata.requires("uniperceiver-moe") if "extra ==" not in r]
    assert not [r for r in core if r.split(">")[0].split("<")[0].split("=")[0].strip() in heavy], core
