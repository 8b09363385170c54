"""Prompt tuning: the PEFT adapter, cached caption generation, 1% sampling, metrics, the Trainer script."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
from modeling_uniperceiver_moe.modeling_uniperceiver_moe import PrefixCache
from prompt_tuning.adapter import DeepPromptConfig
from prompt_tuning.generation import generate_captions
from prompt_tuning.metrics import load_metric
from prompt_tuning.run_prompt_tuning import main as run_prompt_tuning
from prompt_tuning.run_prompt_tuning import KeepBestOnValidation, split_tuning_rows
from tests.conftest import make_batch, tiny_config
from training.tasks import ATTRIBUTES, caption_attributes


def classification_inputs(batch=3, classes=4):
    inputs = make_batch(batch=batch)
    inputs.update(target_input_ids=torch.randint(0, 49000, (classes, 3)),
                  target_attribute_vectors=ATTRIBUTES["class_name_target"].to_tensor().expand(classes, -1),
                  target_task_ids=torch.zeros(classes, dtype=torch.long))
    return inputs


def tuned(routing="attribute", **adapter):
    torch.manual_seed(0)
    base = UniPerceiverMoEForGenericPerception(tiny_config(routing)).eval()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, DeepPromptConfig(num_prompts=3, **adapter))
    return model, reference


def train_one_step(model, inputs, family):
    model.train()
    out = model(**inputs, task_family=family, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    model.eval()


# --------------------------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("routing", ["attribute", "token", "none"])
def test_adapter_round_trip_on_a_fresh_base_gives_identical_outputs(routing, tmp_path):
    model, reference = tuned(routing, num_labels=4, separate_target_prompts=True)
    inputs = classification_inputs()
    train_one_step(model, inputs, "image_classification")
    with torch.no_grad():
        expected = model(**inputs, task_family="image_classification").logits
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == trainable  # the file holds only the trainable tensors
    assert all(("deep_prompt" in k or "norm" in k) and "router" not in k for k in saved)
    fresh = UniPerceiverMoEForGenericPerception(tiny_config(routing)).eval()
    fresh.load_state_dict(reference)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, task_family="image_classification").logits, expected)


def test_only_the_recipe_parameters_change_and_disabling_restores_the_base():
    model, reference = tuned(num_labels=4, separate_target_prompts=True)
    inputs = classification_inputs()
    with torch.no_grad():
        base_logits = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
        base_logits.load_state_dict(reference)
        base_logits = base_logits(**inputs, task_family="image_classification").logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_one_step(model, inputs, "image_classification")
    base = model.get_base_model()
    for name, value in base.state_dict().items():
        if "modules_to_save" in name or "deep_prompt" in name:
            continue
        original = name.replace(".original_module", "").replace(".base_layer", "")
        assert torch.equal(value, reference[original]), name  # frozen: bit-identical, experts and gates included
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert all(p.requires_grad for n, p in model.named_parameters() if n in changed)
    kinds = {("deep_prompt_keys" in n) or ("deep_prompt_values" in n) for n in changed}
    assert True in kinds
    assert any("layer_norm.modules_to_save" in n for n in changed) and any("input_head.norm" in n for n in changed)
    assert any("spe_bias" in n for n in changed) and any("label_weight" in n for n in changed)
    assert not any("router" in n or "qkv" in n or "fc1" in n for n in changed)
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(**inputs, task_family="image_classification").logits, base_logits)


def test_the_label_prompt_is_the_reference_s_weighted_logits_plus_a_linear_layer_on_the_unnormalised_feature():
    """logits -> w * logits + W f + b, f the query's projected feature before its L2 normalisation (the
    reference's `similarity_weight * logit + fc_prompt(feat)`); zero W, b and w = 1 at init leave the logits."""
    torch.manual_seed(0)
    base = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
    inputs = classification_inputs()
    with torch.no_grad():
        plain = base(**inputs, task_family="image_classification")
    model = get_peft_model(base, DeepPromptConfig(num_prompts=0, num_labels=4, spe_bias=False, train_layer_norms=False))
    tuner = model.base_model
    with torch.no_grad():
        assert torch.equal(model(**inputs, task_family="image_classification").logits, plain.logits)
        torch.testing.assert_close(plain.input_features, torch.nn.functional.normalize(plain.input_projections, dim=-1))
        assert not torch.allclose(plain.input_projections.norm(dim=-1), torch.ones(3))  # not unit vectors
        weight, bias = torch.randn(4, base.config.hidden_size), torch.randn(4)
        tuner.deep_prompt_label_weight["default"].copy_(weight)
        tuner.deep_prompt_label_bias["default"].copy_(bias)
        tuner.deep_prompt_similarity_weight["default"].fill_(0.5)
        prompted = model(**inputs, task_family="image_classification")
        torch.testing.assert_close(prompted.logits, 0.5 * plain.logits + plain.input_projections @ weight.t() + bias)


def test_the_adapter_tunes_the_one_shared_head_of_a_reference_shaped_model():
    """With `share_projection_head` (converted checkpoints) the head's LayerNorm is tuned once, for inputs and
    candidates alike, as the reference's prompt tuning tunes its ln_post."""
    torch.manual_seed(0)
    base = UniPerceiverMoEForGenericPerception(tiny_config("attribute", share_projection_head=True)).eval()
    model = get_peft_model(base, DeepPromptConfig(num_prompts=3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_one_step(model, classification_inputs(), "image_classification")
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("input_head.norm.modules_to_save" in n for n in changed)
    assert not any("target_head" in n for n, _ in model.named_parameters())


def test_target_prompts_are_used_only_for_targets():
    model, _ = tuned(separate_target_prompts=True)
    inputs = classification_inputs()
    with torch.no_grad():
        before = model(**inputs, task_family="retrieval")
        layer = model.get_base_model().uniperceiver.encoder.layers[0].attention
        layer.deep_prompt_target_keys["default"].add_(1.0)
        after = model(**inputs, task_family="retrieval")
    assert torch.equal(before.input_features, after.input_features)
    assert not torch.equal(before.target_features, after.target_features)


def test_gated_prompts_start_as_the_frozen_model_and_learn():
    """`prompt_gate`: with its zero gates the adapter's output is the frozen model's, bit for bit (fresh
    prompts without the gate take attention from the real tokens); one step moves the gates, and the gated
    form survives save and load and the cached caption forward."""
    inputs = classification_inputs()
    with torch.no_grad():
        plain, _ = tuned(num_labels=4)
        with plain.disable_adapter():
            frozen = plain(**inputs, task_family="image_classification").logits
        assert not torch.equal(plain(**inputs, task_family="image_classification").logits, frozen)
        gated, _ = tuned(num_labels=4, prompt_gate=True)
        assert torch.equal(gated(**inputs, task_family="image_classification").logits, frozen)
    gates = gated.get_base_model().uniperceiver.encoder.layers[0].attention.deep_prompt_gates["default"]
    train_one_step(gated, inputs, "image_classification")
    assert gates.abs().sum() > 0
    net = gated.get_base_model().eval().uniperceiver
    cached, full, _ = cached_and_full_caption_states(net, torch.randn(2, 3, 16, 16), torch.randint(0, 49000, (2, 5)))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_gated_adapter_round_trip(tmp_path):
    gated, _ = tuned(num_labels=4, prompt_gate=True)
    inputs = classification_inputs()
    train_one_step(gated, inputs, "image_classification")
    with torch.no_grad():
        expected = gated(**inputs, task_family="image_classification").logits
    gated.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, task_family="image_classification").logits, expected)


# --------------------------------------------------------------------------------------------- generation
def cached_and_full_caption_states(net, pixels: torch.Tensor, ids: torch.Tensor):
    """The word and placeholder states of a caption forward two ways: cached (image prefix recorded first,
    then the words alone) and full (the whole sequence, sliced after the SPE + 4 patches). Returns (cached,
    full, the filled cache)."""
    batch, prefix = ids.shape[0], 1 + 4
    task = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        full = net(input_ids=ids, pixel_values=pixels, caption_mode=True, task_ids=task,
                   attribute_vectors=caption_attributes(None, batch, prefix, ids.shape[1])).last_hidden_state
        cache = PrefixCache(recording=True)
        net(pixel_values=pixels, prefix_cache=cache, task_ids=task,
            attribute_vectors=ATTRIBUTES["caption_image"].to_tensor().expand(batch, -1))
        cached = net(input_ids=ids, caption_mode=True, prefix_cache=cache.select(torch.arange(batch)), task_ids=task,
                     attribute_vectors=ATTRIBUTES["caption_text"].to_tensor().expand(batch, -1)).last_hidden_state
    return cached, full[:, prefix:], cache


@pytest.mark.parametrize("routing", ["attribute", "token", "modality"])
def test_cached_prefix_forward_equals_the_full_caption_forward(routing):
    model = UniPerceiverMoEForGenericPerception(tiny_config(routing)).eval().uniperceiver
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 49000, (2, 5))
    words, full, cache = cached_and_full_caption_states(model, pixels, ids)
    # the same function; the cached forward attends over [cached prefix, words] instead of the masked full
    # sequence, so its float32 sums run in another order
    torch.testing.assert_close(words, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="read by a caption_mode forward"):
        model(input_ids=ids, prefix_cache=cache.select(torch.arange(2)))  # not caption_mode
    with pytest.raises(ValueError, match="recording a prefix_cache needs an empty cache"):
        model(pixel_values=pixels, prefix_cache=cache)


def test_spe_bias_reaches_every_spe_token_also_through_the_cached_prefix():
    """The SPE bias is added where the token is [SPE] (the leading SPE and every caption placeholder), not at
    position 0: the cached caption forward, whose position 0 is a word, still equals the full forward."""
    model, _ = tuned()
    bias = model.base_model.deep_prompt_spe_bias["default"]
    with torch.no_grad():
        bias.normal_(std=1.0)
    net = model.get_base_model().eval().uniperceiver
    cached, full, _ = cached_and_full_caption_states(net, torch.randn(2, 3, 16, 16), torch.randint(0, 49000, (2, 5)))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # the bias moves the placeholders (SPE) and the leading SPE, not the words
    embeddings = net.embeddings.word_embeddings
    spe = torch.tensor([[model.config.spe_token_id, 320]])
    with torch.no_grad():
        with model.disable_adapter():
            plain = embeddings(spe)
        torch.testing.assert_close(embeddings(spe)[0, 0], plain[0, 0] + bias)
        torch.testing.assert_close(embeddings(spe)[0, 1], plain[0, 1])


@pytest.mark.parametrize("start_token", [True, False])
def test_beam_search_with_one_beam_is_greedy_decoding_without_a_cache(start_token):
    """Generation starts from the start token, or (`bos_token_id=None`, the reference's texts) from nothing:
    the first placeholder then reads only the image, as the first caption label is trained. Each step scores
    the words as the caption forward does, the captioning family's word bias included."""
    torch.manual_seed(0)
    config = tiny_config("attribute")
    if not start_token:
        config.bos_token_id = None
    model = UniPerceiverMoEForGenericPerception(config).eval()
    vocabulary = torch.tensor([320, 1125, 539, 2368, config.eos_token_id])
    with torch.no_grad():
        model.word_bias.bias.normal_(0.0, 3.0)
    pixels = torch.randn(2, 3, 16, 16)
    cached = generate_captions(model, pixels, vocabulary, beam_size=1, max_length=6)
    with torch.no_grad():
        targets, _ = model.encode_targets(
            input_ids=torch.stack([vocabulary, torch.full_like(vocabulary, config.eos_token_id)], 1),
            attribute_vectors=ATTRIBUTES["word_target"].to_tensor().expand(5, -1), task_ids=torch.zeros(5, dtype=torch.long))
        for row in range(2):
            words, produced = ([config.bos_token_id] if start_token else []), []
            for _ in range(6):
                ids = torch.tensor([words + [config.mask_token_id]])
                out = model(input_ids=ids, pixel_values=pixels[row:row + 1], caption_mode=True,
                            attribute_vectors=caption_attributes(None, 1, 5, ids.shape[1]),
                            task_ids=torch.zeros(1, dtype=torch.long), target_features=targets,
                            candidate_token_ids=vocabulary, task_family="captioning")
                token = int(vocabulary[out.logits[0, -1].argmax()])
                if token == config.eos_token_id:
                    break
                words.append(token)
                produced.append(token)
            assert cached[row] == produced
        model.word_bias.bias.zero_()
    assert generate_captions(model, pixels, vocabulary, beam_size=1, max_length=6) != cached  # the bias counted


def test_beam_search_needs_the_end_token():
    model = UniPerceiverMoEForGenericPerception(tiny_config("attribute")).eval()
    with pytest.raises(ValueError, match="must contain the end token"):
        generate_captions(model, torch.randn(1, 3, 16, 16), torch.tensor([320, 1125]))


# --------------------------------------------------------------------------------------------- sampling
def test_one_percent_sampling_is_per_class_and_deterministic():
    def tuning_rows(rows, fraction, per_class, seed=0):
        return split_tuning_rows(rows, fraction, 0.0, per_class=per_class, seed=seed)[0]

    rows = [{"key": f"r{i}", "label": i % 3} for i in range(950)] + [{"key": f"s{i}", "label": 3} for i in range(50)]
    chosen = tuning_rows(rows, 0.01, per_class=True)
    counts = {c: sum(r["label"] == c for r in chosen) for c in range(4)}
    n = {c: sum(r["label"] == c for r in rows) for c in range(4)}
    assert counts == {c: math.floor(0.01 * n[c]) + 1 for c in range(4)}  # 317 -> 4, 316 -> 4, 50 -> 1
    assert chosen == tuning_rows(list(reversed(rows)), 0.01, per_class=True)
    assert chosen != tuning_rows(rows, 0.01, per_class=True, seed=1)
    assert len(tuning_rows(rows, 0.01, per_class=False)) == 10
    with pytest.raises(ValueError, match="data_fraction"):
        tuning_rows(rows, 0.0, per_class=False)
    with pytest.raises(ValueError, match="validation_fraction"):
        split_tuning_rows(rows, 0.01, 1.0, per_class=False)


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values():
    assert load_metric("accuracy").compute(predictions=[1, 2, 3, 0], references=[1, 2, 0, 0])["accuracy"] == 0.75
    # BLEU-4: precisions 5/6, 3/5, 2/4, 1/3, equal lengths -> (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    bleu = load_metric("bleu").compute(predictions=["the cat sat on the mat"], references=[["the cat sat on a mat"]])
    assert bleu["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-9)
    # CIDEr-D: one-word captions have only unigrams; a perfect match scores cosine 1 on n=1, 0 on n=2..4:
    # 10 * (1 + 0 + 0 + 0) / 4 = 2.5 per caption; a miss scores 0.
    cider = load_metric("cider").compute(predictions=["cat", "cow"], references=[["cat"], ["dog"]])
    assert cider["per_caption"] == [2.5, 0.0] and cider["cider"] == 1.25
    # retrieval: image 0 ranks its text 1st, image 1 ranks its text 3rd, image 2 ranks its text 2nd
    scores = [[0.9, 0.1, 0.3], [0.2, 0.1, 0.8], [0.5, 0.6, 0.55]]
    recall = load_metric("retrieval_recall").compute(predictions=scores, references=[0, 1, 2], ks=(1, 2))
    assert recall["i2t_R@1"] == pytest.approx(1 / 3) and recall["i2t_R@2"] == pytest.approx(2 / 3)
    # text 0 -> images [0.9, 0.2, 0.5]: 1st; text 1 -> [0.1, 0.1, 0.6]: tie with image 0 counts against: 3rd;
    # text 2 -> [0.3, 0.8, 0.55]: 2nd
    assert recall["t2i_R@1"] == pytest.approx(1 / 3) and recall["t2i_R@2"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt"))
    config = tiny_config("attribute", moe_layers="every_other", layer_scale_init=0.1)
    UniPerceiverMoEForGenericPerception(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("task,method,metric", [
    ("fashion_mnist_classification", "prompt", "accuracy"),
    ("fashion_mnist_classification", "linear_probe", "accuracy"),
    ("fashion_mnist_classification", "full", "accuracy"),
    ("emoji_captioning", "prompt", "cider"),
    ("emoji_retrieval", "prompt", "i2t_R@1"),
    ("video_clip_classification", "prompt", "accuracy"),
])
def test_script_runs_end_to_end_on_the_tiny_real_data(task, method, metric, tiny_cache, tiny_checkpoint, tmp_path,
                                                     monkeypatch):
    """...and its batches are dense: a broadcast view (a zero stride) cannot be pinned for a GPU."""
    from prompt_tuning.run_prompt_tuning import Collator

    collated, collate = [], Collator.__call__
    monkeypatch.setattr(Collator, "__call__", lambda self, rows: collated.append(collate(self, rows)) or collated[-1])
    out = str(tmp_path / "run")
    results = run_prompt_tuning(["--model", tiny_checkpoint, "--task", task, "--method", method, "--data_fraction", "0.05",
                                 "--data_cache", tiny_cache, "--slice", "tiny", "--max_steps", "3", "--eval_samples", "16",
                                 "--output_dir", out, "--vocabulary_size", "64"])
    assert metric in results["after"] and 0.0 <= results["after"][metric] <= (10.0 if metric == "cider" else 1.0)
    written = json.load(open(os.path.join(out, "results.json")))
    assert written["train_samples"] == results["train_samples"] and written["train_seconds"] > 0
    if method == "prompt":
        adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
        assert sum(t.numel() for t in adapter.values()) == results["trainable_parameters"]
        assert results["trainable_parameters"] < 0.05 * results["total_parameters"]
    if task == "fashion_mnist_classification":
        assert results["train_samples"] >= 10  # at least one image per class
    broadcast = {key for batch in collated for key, value in batch.items()
                 if torch.is_tensor(value) and value.numel() > 1 and 0 in value.stride()}
    assert collated and not broadcast


def test_held_out_loss_during_tuning_changes_nothing_it_measures(tiny_cache, tiny_checkpoint, tmp_path):
    """--held_out_curve records the held-out loss from step 0 and plots it; the tuning itself, its validation
    losses and chosen step are unchanged, and a gated adapter starts exactly at the frozen model's held-out loss."""
    common = ["--model", tiny_checkpoint, "--task", "emoji_captioning", "--data_fraction", "0.05", "--data_cache",
              tiny_cache, "--slice", "tiny", "--max_steps", "4", "--eval_samples", "16", "--vocabulary_size", "64",
              "--prompt_gate", "--no_zero_shot", "--eval_steps", "2"]
    plain = run_prompt_tuning(common + ["--output_dir", str(tmp_path / "plain")])
    watched = run_prompt_tuning(common + ["--output_dir", str(tmp_path / "watched"), "--held_out_curve"])
    assert watched["train_loss"] == plain["train_loss"] and watched["after"] == plain["after"]
    assert watched["validation_loss"] == plain["validation_loss"] and watched["selected_step"] == plain["selected_step"]
    assert [step for step, _ in watched["held_out_loss"]] == [0, 2, 4]
    assert [step for step, _ in watched["validation_loss"]] == [0, 2, 4] and watched["validation_samples"] > 0
    assert watched["validation_metric"] == "cider" and len(watched["validation_score"]) == 3
    assert watched["selected_step"] == max(watched["validation_score"], key=lambda point: point[1])[0]
    assert watched["held_out_loss"][0][1] == pytest.approx(watched["zero_shot_held_out_loss"], rel=1e-6)
    assert watched["held_out_loss"][-1][1] != watched["held_out_loss"][0][1]
    assert os.path.getsize(tmp_path / "watched" / "tuning_curve.png") > 0
    assert "held_out_loss" not in plain
    with pytest.raises(SystemExit, match="--validation_fraction 0 without --held_out_curve evaluates neither"):
        run_prompt_tuning(common + ["--output_dir", str(tmp_path / "bad"), "--validation_fraction", "0"])
    for flag, value, message in (("--eval_steps", "0", "--eval_steps must be a positive number of steps, got 0"),
                                 ("--early_stopping_patience", "-1", "--early_stopping_patience must be 0"),
                                 ("--validation_fraction", "1", r"--validation_fraction must be in \[0, 1\), got 1")):
        with pytest.raises(SystemExit, match=message):
            run_prompt_tuning(common + ["--output_dir", str(tmp_path / "bad"), flag, value])
        assert not os.path.exists(tmp_path / "bad")


def test_validation_rows_are_disjoint_from_the_tuning_rows_and_counted_by_the_same_rule():
    rows = [{"key": f"r{i}", "label": i % 3} for i in range(950)] + [{"key": f"s{i}", "label": 3} for i in range(50)]
    tuning, validation = split_tuning_rows(rows, 0.01, 0.01, per_class=True, seed=0)
    assert tuning == split_tuning_rows(rows, 0.01, 0.0, per_class=True, seed=0)[0]  # validation takes no tuning row
    assert not {r["key"] for r in tuning} & {r["key"] for r in validation}
    assert {c: sum(r["label"] == c for r in validation) for c in range(4)} == {0: 4, 1: 4, 2: 4, 3: 1}
    tuning, validation = split_tuning_rows(rows, 0.01, 0.02, per_class=False, seed=0)
    assert (len(tuning), len(validation)) == (10, 20)
    assert split_tuning_rows(rows, 0.01, 0.0, per_class=False)[1] == []
    # a class of one row gives it to tuning, none to validation
    assert split_tuning_rows([{"key": "a", "label": 0}], 0.01, 0.01, per_class=True) == ([{"key": "a", "label": 0}], [])


class _Control:
    should_training_stop = False


def test_the_kept_model_is_the_one_of_the_best_validation_score_and_patience_stops_training():
    """Scores 0.1, 0.5, 0.5, 0.4 at steps 0..3 with patience 2: the parameters of step 1 (the earliest of the
    tie) are written back at the end, and training is told to stop at step 3 (two evaluations without a
    higher score), not before; evaluations of other sets are not validation rounds."""
    from types import SimpleNamespace

    model = nn.Linear(2, 1)
    model.bias.requires_grad = False
    scores = iter([0.1, 0.5, 0.5, 0.4])
    keeper = KeepBestOnValidation(model, lambda: next(scores), patience=2)
    control = _Control()
    kept = None
    for step in range(4):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(float(step))
        if step == 1:
            kept = model.weight.detach().clone()
        assert not control.should_training_stop
        keeper.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_validation_loss": 3.0 - step})
        keeper.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_held_out_loss": 0.0})
    assert control.should_training_stop and keeper.best_step == 1
    assert keeper.history == [(0, 0.1), (1, 0.5), (2, 0.5), (3, 0.4)]
    keeper.on_train_end(None, None, control)
    assert torch.equal(model.weight, kept) and model.bias.item() == 3.0  # only trainable parameters are kept
    # evaluations within the warmup (steps <= patience_from) do not count towards the patience
    scores = iter([0.5, 0.1, 0.1, 0.1, 0.1])
    keeper, control = KeepBestOnValidation(model, lambda: next(scores), patience=2, patience_from=2), _Control()
    stopped = []
    for step in range(5):
        keeper.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_validation_loss": 1.0})
        stopped.append(control.should_training_stop)
    assert stopped == [False, False, False, False, True] and keeper.best_step == 0
    # the untuned start is recorded but not kept unless it is the pre-trained model
    scores = iter([0.9, 0.2, 0.3])
    keeper = KeepBestOnValidation(model, lambda: next(scores), start_is_candidate=False)
    for step in range(3):
        keeper.on_evaluate(None, SimpleNamespace(global_step=step), _Control(), metrics={"eval_validation_loss": 1.0})
    assert keeper.best_step == 2 and [point[1] for point in keeper.history] == [0.9, 0.2, 0.3]


def test_script_options_come_as_flags_in_either_spelling_or_as_a_yaml_file(tmp_path, capsys):
    from prompt_tuning.run_prompt_tuning import parse_args

    flags = parse_args(["--model", "ckpt", "--task", "emoji_captioning", "--data_fraction", "0.05", "--max-steps", "3"])
    assert (flags.data_fraction, flags.max_steps, flags.method, flags.no_zero_shot) == (0.05, 3, "prompt", False)
    options = tmp_path / "run.yaml"
    options.write_text("model: ckpt\ntask: emoji_captioning\ndata_fraction: 0.05\nmax_steps: 3\n")
    assert parse_args([str(options)]) == flags
    with pytest.raises(SystemExit):
        parse_args(["--task", "emoji_captioning"])
    assert "--model" in capsys.readouterr().err  # argparse names the missing option


def test_script_rejects_pre_training_only_tasks(tiny_checkpoint):
    with pytest.raises(SystemExit, match="MLM is a pre-training task"):
        run_prompt_tuning(["--model", tiny_checkpoint, "--task", "austen_mlm"])
    with pytest.raises(SystemExit, match="'glue_sst2' reads 'glue' rows, which no data slice bundles"):
        run_prompt_tuning(["--model", tiny_checkpoint, "--task", "glue_sst2"])
    with pytest.raises(SystemExit, match="unknown task 'imagenet'; registered tasks"):
        run_prompt_tuning(["--model", tiny_checkpoint, "--task", "imagenet"])
    with pytest.raises(SystemExit, match="cannot load the model from"):
        run_prompt_tuning(["--model", "/nonexistent/ckpt", "--task", "emoji_captioning"])
