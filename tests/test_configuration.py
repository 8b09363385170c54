import pytest
from transformers import AutoConfig

from modeling_uniperceiver_moe import SIZE_PRESETS, UniPerceiverMoEConfig
from tests.conftest import tiny_config


@pytest.mark.parametrize("size,layers,hidden,heads", [("ti", 12, 192, 3), ("s", 12, 384, 6), ("b", 12, 768, 12), ("l", 24, 1024, 16)])
def test_size_presets_match_the_paper(size, layers, hidden, heads):
    cfg = AutoConfig.for_model("uniperceiver_moe", model_size=size)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (layers, hidden, heads)
    assert cfg.intermediate_size == 4 * hidden
    assert set(SIZE_PRESETS) == {"ti", "s", "b", "l"}


def test_explicit_values_win_over_the_preset_and_survive_a_round_trip():
    cfg = UniPerceiverMoEConfig(model_size="b", num_hidden_layers=4, moe_routing="attribute")
    again = UniPerceiverMoEConfig.from_dict(cfg.to_dict())
    assert again.num_hidden_layers == 4 and again.hidden_size == 768
    assert again.to_dict() == cfg.to_dict()


def test_moe_layer_selection():
    assert tiny_config(num_hidden_layers=6, moe_layers="every_other").moe_layer_indices() == [1, 3, 5]
    assert tiny_config(num_hidden_layers=3, moe_layers="all").moe_layer_indices() == [0, 1, 2]
    assert tiny_config(num_hidden_layers=6, moe_layers=[0, 4]).moe_layer_indices() == [0, 4]
    assert tiny_config(routing="none").moe_layer_indices() == []


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"moe_routing": "expert-choice"}, "moe_routing"),
        ({"moe_num_experts": 1}, "moe_num_experts"),
        ({"moe_top_k": 5}, "moe_top_k"),
        ({"moe_layers": [7]}, "moe_layers"),
        ({"moe_layers": "odd"}, "moe_layers"),
        ({"moe_projections": ["attn_q"]}, "moe_projections"),
        ({"moe_capacity_factor": 0.0}, "moe_capacity_factor"),
        ({"moe_aux_loss_coef": -1.0}, "moe_aux_loss_coef"),
        ({"moe_router_noise_std": -0.1}, "moe_router_noise_std"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"image_size": 20}, "image_size"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"drop_path_schedule": "cosine"}, "drop_path_schedule"),
        ({"model_size": "xl"}, "model_size"),
        ({"hidden_size": 30, "num_attention_heads": 2}, "hidden_size"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_folding_only_for_data_independent_routing():
    with pytest.raises(ValueError, match="folded_routes"):
        tiny_config(routing="token", folded_routes=[[0] * 8])


def test_a_saved_config_without_text_distance_bias_loads_without_the_bias(tmp_path):
    """A new config gets the defaults (local attention between words, a word bias); a config.json that does not
    name an option describes a model whose weights were made without it."""
    import json

    config = UniPerceiverMoEConfig(model_size="ti")
    assert config.text_distance_bias == "alibi"
    config.save_pretrained(tmp_path)
    assert UniPerceiverMoEConfig.from_pretrained(tmp_path).text_distance_bias == "alibi"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["word_logit_bias"] is True
    del saved["text_distance_bias"], saved["word_logit_bias"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert UniPerceiverMoEConfig.from_pretrained(tmp_path).text_distance_bias == "none"
    assert UniPerceiverMoEConfig.from_pretrained(tmp_path).word_logit_bias is False
    assert UniPerceiverMoEConfig.from_pretrained(tmp_path, text_distance_bias="alibi").text_distance_bias == "alibi"
