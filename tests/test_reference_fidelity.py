"""A converted official checkpoint computes what the official Uni-Perceiver-MoE code computes.

`tests/fixtures/official_tiny_moe.safetensors` holds the state dict of a tiny official model (width 64, 4
layers, 2 heads, 4 attribute-routed experts in the qkv, output, fc1 and fc2 projections of layers 0 and 2,
32 px images with patch 8; random weights) under the reference's own key names, the inputs of three
cases and the outputs of the official modules for them (encoder states, `loss_prepare` features,
logits), made by `benchmarks/official_fixture/make_fixture.py` from the official repository: data only.
Only the token-table rows the inputs use are stored (the rest of the table is zero).

Each test converts that state dict with `hub_cards.convert_reference`, builds our inputs the way our own
batch builders and attribute registry do, and compares in float32 (max abs diff < 1e-4).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hub_cards.convert_reference as conv
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
from training.tasks import ATTRIBUTES, TASKS, caption_attributes

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official_tiny_moe.safetensors")
TABLE = "token_embed.embeddings.weight"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


@pytest.fixture(scope="module")
def converted(official) -> UniPerceiverMoEForGenericPerception:
    state = {key[len("state."):]: value for key, value in official.items() if key.startswith("state.")}
    rows, values = official[f"state_rows.{TABLE}.index"], official[f"state_rows.{TABLE}.values"]
    state[TABLE] = torch.zeros(49411, values.shape[1]).index_copy_(0, rows, values)
    config = conv.infer_config(state, num_attention_heads=2)  # heads are not stored in the weights
    model = UniPerceiverMoEForGenericPerception(config)
    model.load_state_dict(conv.convert_state_dict(state, config), strict=True)
    return model.eval()


def rows(vector: torch.Tensor, count: int) -> torch.Tensor:
    return vector.to_tensor()[None].expand(count, -1) if hasattr(vector, "to_tensor") else vector


def max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float((ours.float() - theirs.float()).abs().max())


def test_the_inferred_config_is_the_reference_s(converted):
    config = converted.config
    assert config.moe_layers == [0, 2] and config.moe_num_experts == 4 and config.moe_routing == "attribute"
    assert config.bos_token_id is None and config.text_distance_bias == "none" and config.share_projection_head
    assert not config.word_logit_bias


@torch.no_grad()
def test_image_classification_matches_the_official_modules(official, converted):
    """Encoder states of [SPE, 16 patches], the SPE feature, the class-name features (names as the reference
    encodes them: `name <|endoftext|>`, padded) and the scaled-cosine logits."""
    task = TASKS["fashion_mnist_classification"]
    pixels, names = official["a.pixel_values"], official["a.class_ids"]
    names_mask = 1 - official["a.class_invalid_mask"].long()
    inputs = rows(task.input_attributes, 2)
    out = converted.uniperceiver(pixel_values=pixels, attribute_vectors=inputs)
    assert max_diff(out.last_hidden_state, official["a.hidden"]) < TOLERANCE
    assert max_diff(converted.input_head(out.pooler_output), F.normalize(official["a.features"], dim=-1)) < TOLERANCE
    targets, _ = converted.encode_targets(input_ids=names, attention_mask=names_mask,
                                          attribute_vectors=rows(task.target_attributes, 3))
    assert max_diff(targets, F.normalize(official["a.class_features"], dim=-1)) < TOLERANCE
    logits = converted(pixel_values=pixels, attribute_vectors=inputs, target_input_ids=names,
                       target_attention_mask=names_mask, target_attribute_vectors=rows(task.target_attributes, 3),
                       task_family=task.family).logits
    assert max_diff(logits, official["a.logits"]) < TOLERANCE


@torch.no_grad()
def test_captioning_with_placeholders_matches_the_official_modules(official, converted):
    """[SPE, 16 patches, 4 words + <|endoftext|>, 5 placeholders] under the caption mask: every state, and the
    logits of each placeholder over the word candidates (`w <|endoftext|>`); placeholder i predicts word i."""
    task = TASKS["emoji_captioning"]
    pixels, words, vocabulary = official["b.pixel_values"], official["b.caption_ids"], official["b.vocab_ids"]
    attributes = caption_attributes(task, 2, 17, words.shape[1])
    out = converted.uniperceiver(pixel_values=pixels, input_ids=words, caption_mode=True, attribute_vectors=attributes)
    assert max_diff(out.last_hidden_state, official["b.hidden"]) < TOLERANCE
    assert max_diff(out.last_hidden_state[:, -words.shape[1]:], official["b.placeholder_hidden"]) < TOLERANCE
    logits = converted(pixel_values=pixels, input_ids=words, caption_mode=True, attribute_vectors=attributes,
                       target_input_ids=vocabulary, target_attribute_vectors=rows(task.target_attributes, len(vocabulary)),
                       task_family=task.family).logits
    assert max_diff(logits.reshape(-1, len(vocabulary)), official["b.logits"]) < TOLERANCE


@torch.no_grad()
def test_masked_language_modelling_matches_the_official_modules(official, converted):
    """A sentence with two words hidden by <|spe|>: every state, and the logits at the hidden words over the
    word candidates."""
    task = TASKS["austen_mlm"]
    ids, vocabulary, hidden = official["c.input_ids"], official["b.vocab_ids"], official["c.masked_positions"]
    assert (ids[hidden[:, 0], hidden[:, 1]] == converted.config.spe_token_id).all()
    inputs = rows(task.input_attributes, 2)
    out = converted.uniperceiver(input_ids=ids, attribute_vectors=inputs)
    assert max_diff(out.last_hidden_state, official["c.hidden"]) < TOLERANCE
    query_positions = torch.stack([hidden[hidden[:, 0] == row, 1] for row in range(2)])
    logits = converted(input_ids=ids, attribute_vectors=inputs, query_positions=query_positions,
                       target_input_ids=vocabulary, target_attribute_vectors=rows(task.target_attributes, len(vocabulary)),
                       task_family=task.family).logits
    assert max_diff(logits.reshape(-1, len(vocabulary)), official["c.logits"]) < TOLERANCE


def test_our_attribute_registry_gives_the_rows_the_official_gates_saw():
    """Each case's attribute rows, as the fixture's generator recorded them from the official gates' inputs."""
    import json

    with open(FIXTURE.replace(".safetensors", ".json"), encoding="utf-8") as handle:
        cases = json.load(handle)["cases"]

    def official(case: str, call: str) -> list:
        return cases[case][call]["moe_gate_attribute_rows"]

    assert official("a", "input_call") == [ATTRIBUTES["classification_input"].to_list()]
    assert official("a", "class_target_call") == [ATTRIBUTES["class_name_target"].to_list()]
    assert official("b", "input_call") == [ATTRIBUTES["caption_image"].to_list(), ATTRIBUTES["caption_text"].to_list()]
    assert official("b", "vocab_target_call") == official("c", "vocab_target_call") == [ATTRIBUTES["word_target"].to_list()]
    assert official("c", "input_call") == [ATTRIBUTES["text_input"].to_list()]


# --------------------------------------------------------------------------------------------- prompt tuning
@pytest.fixture(scope="module")
def official_prompt_tuned() -> dict[str, torch.Tensor]:
    """The same tiny official model prompt-tuned as the reference's ImageNet prompt-tuning config does (deep
    prompts of 10 in every layer, the label prompt `fc_prompt` / `similarity_weight`, the SPE bias, tuned
    LayerNorms), every prompt-tuning tensor random; made by `make_fixture_prompt.py`."""
    tensors = load_file(FIXTURE.replace(".safetensors", "_prompt.safetensors"))
    state = {key[len("state."):]: value for key, value in tensors.items() if key.startswith("state.")}
    rows, values = tensors[f"state_rows.{TABLE}.index"], tensors[f"state_rows.{TABLE}.values"]
    state[TABLE] = torch.zeros(49411, values.shape[1]).index_copy_(0, rows, values)
    return {"state": state, **{k: v for k, v in tensors.items() if not k.startswith("state")}}


@torch.no_grad()
def test_a_prompt_tuned_official_checkpoint_converts_into_our_adapter_with_the_same_logits(official_prompt_tuned):
    """The deep prompts become key/value prompts (inputs and candidates each with their own route), the label
    prompt, the SPE bias and the tuned LayerNorms their counterparts: same encoder states and logits."""
    fixture, task = official_prompt_tuned, TASKS["fashion_mnist_classification"]
    config = conv.infer_config(conv.split_prompt_tuning(fixture["state"])[0], num_attention_heads=2)
    tuned = conv.convert_prompt_tuned(fixture["state"], config, task.input_attributes.to_tensor(),
                                      task.target_attributes.to_tensor())
    names, names_mask = fixture["a.class_ids"], 1 - fixture["a.class_invalid_mask"].long()
    out = tuned(pixel_values=fixture["a.pixel_values"], attribute_vectors=rows(task.input_attributes, 2),
                target_input_ids=names, target_attention_mask=names_mask,
                target_attribute_vectors=rows(task.target_attributes, 3), task_family=task.family)
    assert max_diff(out.input_outputs.last_hidden_state, fixture["a.hidden"]) < TOLERANCE
    assert max_diff(out.target_features, F.normalize(fixture["a.class_features"], dim=-1)) < TOLERANCE
    assert max_diff(out.logits, fixture["a.logits"]) < TOLERANCE
    with tuned.disable_adapter():  # without the prompts the logits are not the tuned ones
        plain = tuned(pixel_values=fixture["a.pixel_values"], attribute_vectors=rows(task.input_attributes, 2),
                      target_input_ids=names, target_attention_mask=names_mask,
                      target_attribute_vectors=rows(task.target_attributes, 3), task_family=task.family)
    assert max_diff(plain.logits, fixture["a.logits"]) > 0.1


@torch.no_grad()
def test_a_prompt_tuned_official_captioning_checkpoint_converts_with_the_same_placeholder_logits(official_prompt_tuned):
    """Captioning's prompts join keys routed by the image row (the sequence's first attribute row); the reference's
    caption prompt tuning has no label prompt."""
    fixture, task = official_prompt_tuned, TASKS["emoji_captioning"]
    state = {k: v for k, v in fixture["state"].items() if not k.startswith(("fc_prompt.", "similarity_weight"))}
    config = conv.infer_config(conv.split_prompt_tuning(state)[0], num_attention_heads=2)
    tuned = conv.convert_prompt_tuned(state, config, ATTRIBUTES["caption_image"].to_tensor(),
                                      task.target_attributes.to_tensor())
    words, vocabulary = fixture["b.caption_ids"], fixture["b.vocab_ids"]
    out = tuned(pixel_values=fixture["b.pixel_values"], input_ids=words, caption_mode=True,
                attribute_vectors=caption_attributes(task, 2, 17, words.shape[1]), target_input_ids=vocabulary,
                target_attribute_vectors=rows(task.target_attributes, len(vocabulary)), task_family=task.family)
    assert max_diff(out.input_outputs.last_hidden_state, fixture["b.hidden"]) < TOLERANCE
    assert max_diff(out.logits.reshape(-1, len(vocabulary)), fixture["b.logits"]) < TOLERANCE


# --------------------------------------------------------------------------------------------- GLUE prompts
GLUE_FIXTURE = os.path.join(os.path.dirname(FIXTURE), "official_glue_templates.json")
# the official task names and ours; our label ids are those of the Hub's `nyu-mll/glue`
GLUE_NAMES = {"SST-2": "glue_sst2", "CoLA": "glue_cola", "RTE": "glue_rte", "MRPC": "glue_mrpc", "QQP": "glue_qqp",
              "QNLI": "glue_qnli", "MNLI_Match": "glue_mnli"}


@pytest.fixture(scope="module")
def glue_fixture() -> dict:
    import json

    with open(GLUE_FIXTURE, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def reference_text_context():
    """Texts as the reference tokenises them: no start token."""
    from modeling_uniperceiver_moe import UniPerceiverMoEConfig
    from modeling_uniperceiver_moe.tokenization_uniperceiver_moe import build_uniperceiver_tokenizer
    from training.tasks import TaskContext

    return TaskContext(build_uniperceiver_tokenizer(), None, UniPerceiverMoEConfig(bos_token_id=None),
                       max_text_length=256)


@pytest.mark.parametrize("official_name", sorted(GLUE_NAMES))
def test_glue_prompts_are_the_official_token_ids_with_the_query_at_its_spe(glue_fixture, reference_text_context,
                                                                         official_name):
    """The official GLUE dataset code's input ids (its prompts, lower-casing, dropped final periods) and
    `spe_index`, for sentences with capitals, final periods, a question mark and an HTML entity."""
    from training.tasks import build_batch

    task = TASKS[GLUE_NAMES[official_name]]
    examples = glue_fixture["tasks"][official_name]["examples"]
    for example in examples:
        assert reference_text_context.prompt(task.template, example["sentences"]) == example["input_ids"]
    rows = [dict(zip(task.template.columns, example["sentences"]), label=0) for example in examples]
    reference_text_context.label_names[task.name] = list(task.template.label_words)
    batch = build_batch(task, rows, reference_text_context, epoch=0)
    ids, query = batch.inputs["input_ids"], batch.inputs["query_positions"][:, 0]
    assert query.tolist() == [example["spe_index"] for example in examples]
    assert (ids[torch.arange(len(examples)), query] == glue_fixture["spe_token_id"]).all()


@pytest.mark.parametrize("official_name", sorted(GLUE_NAMES))
def test_glue_label_words_are_the_official_targets(glue_fixture, reference_text_context, official_name):
    """Each label word encodes as the official target set does (`word <|endoftext|>`); our label ids follow
    the Hub's GLUE rows, so the words are the official ones, reordered where the Hub numbers entailment 0."""
    task = TASKS[GLUE_NAMES[official_name]]
    official = glue_fixture["tasks"][official_name]
    assert sorted(task.template.label_words) == sorted(official["label_words"])
    reference_text_context.label_names[task.name] = list(task.template.label_words)
    targets = reference_text_context.label_targets(task)
    for row, word in enumerate(task.template.label_words):
        length = int(targets["target_attention_mask"][row].sum())
        expected = official["label_word_ids"][official["label_words"].index(word)]
        assert targets["target_input_ids"][row, :length].tolist() == expected, word
    entailment_first = {"RTE", "QNLI", "MNLI_Match"}
    assert (task.template.label_words[0] == "yes") == (official_name in entailment_first)
