"""The model learns from scratch: the SPE output depends on the input at init, a short single-task run gets far
above chance, and the report's trivial baselines are what ignoring the input scores."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.init_signal import mean_pairwise_cosine
from conftest import IMAGE_INPUT, TEXT_INPUT, tiny_config
from modeling_uniperceiver_moe import REFERENCE_INIT, UniPerceiverMoEForGenericPerception
from modeling_uniperceiver_moe.routing import RouterLinear


@torch.no_grad()
def spe_cosines(routing: str, **overrides) -> tuple[float, float]:
    """Mean pairwise cosine of the SPE output over 8 different random images and 8 different random texts."""
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(routing, **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    ids = torch.randint(0, 49408, (8, 6), generator=g)
    encoder = model.uniperceiver
    images = encoder(pixel_values=pixels, attribute_vectors=IMAGE_INPUT.to_tensor().expand(8, -1), task_ids=torch.zeros(8, dtype=torch.long))
    texts = encoder(input_ids=ids, attribute_vectors=TEXT_INPUT.to_tensor().expand(8, -1), task_ids=torch.zeros(8, dtype=torch.long))
    return mean_pairwise_cosine(images.pooler_output), mean_pairwise_cosine(texts.pooler_output)


@pytest.mark.parametrize("routing", ["none", "token", "attribute"])
def test_spe_output_depends_on_the_input_at_init(routing):
    image_cosine, text_cosine = spe_cosines(routing)
    assert image_cosine < 0.99 and text_cosine < 0.99, (image_cosine, text_cosine)


def test_reference_init_collapses_the_spe_output():
    """The diagnosed failure mode, kept as the faithful preset: with std 0.02 and LayerScale 1e-3 every input
    gets (to 6 digits) the same SPE output, so every candidate gets the same logit."""
    image_cosine, text_cosine = spe_cosines("attribute", **REFERENCE_INIT)
    assert image_cosine > 0.99999 and text_cosine > 0.99999


def test_fan_in_init_scales_projections_and_keeps_routers_near_uniform():
    model = UniPerceiverMoEForGenericPerception(tiny_config("attribute"))
    layer = model.uniperceiver.encoder.layers[0]
    width = model.config.hidden_size
    assert layer.mlp.fc1.weight.std().item() == pytest.approx(width ** -0.5, rel=0.15)
    assert layer.mlp.fc2.weight.std().item() == pytest.approx(model.config.intermediate_size ** -0.5, rel=0.15)
    routers = [m for m in model.modules() if isinstance(m, RouterLinear)]
    assert routers and all(m.weight.std().item() == pytest.approx(0.02, rel=0.25) for m in routers)
    fixed = UniPerceiverMoEForGenericPerception(tiny_config("attribute", initializer_scheme="fixed"))
    assert fixed.uniperceiver.encoder.layers[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.15)
    with pytest.raises(ValueError, match="initializer_scheme"):
        tiny_config("attribute", initializer_scheme="xavier")


def position_cosines(table: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(table.float(), dim=1)
    return unit @ unit.T


def test_sincos_text_positions_start_similar_for_neighbours_and_survive_save_and_load(tmp_path):
    """`text_position_init="sincos"` (the default) starts the learned text table from 1-D sin-cos positions of
    the word embeddings' RMS: neighbours similar, distant positions less so; the reference's `"normal"` draws
    independent rows. A saved table (here a trained-looking random one) is loaded as saved, not re-drawn."""
    model = UniPerceiverMoEForGenericPerception(tiny_config("none"))
    table = model.uniperceiver.embeddings.position_embeddings.weight.detach()
    assert model.config.text_position_init == "sincos"
    assert table.pow(2).mean().sqrt().item() == pytest.approx(model.config.initializer_range, rel=1e-5)
    cosines = position_cosines(table)
    assert cosines[10, 11] > 0.9 and cosines[10, 11] > cosines[10, 13] > cosines[10, 30]
    reference = UniPerceiverMoEForGenericPerception(tiny_config("none", **REFERENCE_INIT))
    assert position_cosines(reference.uniperceiver.embeddings.position_embeddings.weight.detach())[10, 11].abs() < 0.5

    with torch.no_grad():
        model.uniperceiver.embeddings.position_embeddings.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = UniPerceiverMoEForGenericPerception.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.uniperceiver.embeddings.position_embeddings.weight,
                               model.uniperceiver.embeddings.position_embeddings.weight, rtol=0, atol=0)


def test_vision_sincos_positions_are_the_2d_formula():
    """The 2-D table is rows then columns, each `dim / 4` frequencies 1 / 10000^(i / (dim / 4)), sin then cos."""
    from modeling_uniperceiver_moe.modeling_uniperceiver_moe import sincos_2d_position_embedding

    table = sincos_2d_position_embedding(3, 5, 16)
    row, col = 1, 4  # the token at row 1, column 4
    omega = [1 / 10000 ** (i / 4) for i in range(4)]
    expected = ([torch.sin(torch.tensor(row * w, dtype=torch.float64)) for w in omega]
                + [torch.cos(torch.tensor(row * w, dtype=torch.float64)) for w in omega]
                + [torch.sin(torch.tensor(col * w, dtype=torch.float64)) for w in omega]
                + [torch.cos(torch.tensor(col * w, dtype=torch.float64)) for w in omega])
    torch.testing.assert_close(table[row * 5 + col], torch.stack(expected).float())


def learning_config(cache: str, output_dir: str, **model) -> dict:
    return {
        "output_dir": output_dir, "seed": 0,
        "model": {"model_size": None, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8, "num_frames": 4, "max_position_embeddings": 40,
                  "moe_routing": "attribute", "moe_num_experts": 4, "moe_layers": "every_other",
                  "drop_path_rate": 0.0, **model},
        "data": {"cache_dir": cache, "slice": "tiny", "build": False, "eval_samples": 64, "vocabulary_size": 256},
        "optim": {"lr": 1e-3, "weight_decay": 0.05, "grad_clip": 1.0},
        "train": {"max_steps": 120, "warmup_steps": 10, "log_every": 40, "eval_every": 0, "save_every": 0,
                  "tracker": None},
        "tasks": {"fashion_mnist_classification": {"batch_size": 32}},
    }


def test_fashion_mnist_learns_from_scratch(tiny_cache, tmp_path):
    """120 steps of 32 on the tiny slice's 256 rows: far above chance (0.1) and the majority class. The
    reference initialisation stayed at chance here (test_reference_init_stays_at_chance)."""
    from training.config import parse_config
    from training.trainer import Pretrainer

    trainer = Pretrainer(parse_config(learning_config(tiny_cache, str(tmp_path / "run"))))
    metrics = trainer.train()["fashion_mnist_classification"]
    majority = trainer.baselines["fashion_mnist_classification"]["value"]
    assert metrics["accuracy"] >= 0.45, metrics  # 0.61 measured; chance 0.1
    assert metrics["accuracy"] > majority + 0.3
    assert metrics["distinct_predictions"] >= 6
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| trivial baseline |" in report and "| distinct |" in report


@pytest.mark.slow
def test_reference_init_stays_at_chance(tiny_cache, tmp_path):
    from training.config import parse_config
    from training.trainer import Pretrainer

    config = learning_config(tiny_cache, str(tmp_path / "run"), **REFERENCE_INIT)
    metrics = Pretrainer(parse_config(config)).train()["fashion_mnist_classification"]
    assert metrics["accuracy"] < 0.3, metrics


@pytest.mark.parametrize("word_prior", [True, False])
def test_the_trainer_starts_the_word_bias_at_the_answer_log_frequencies(tiny_cache, tmp_path, word_prior):
    """`data.word_prior`: the MLM and captioning families' word bias starts at the log-frequencies of their
    answers in the training rows (differences between two words = log of their count ratio), so a new model
    already scores the most frequent answer highest on average; other families and words outside the
    candidate vocabulary keep 0. Without it the bias starts at 0."""
    from training.config import parse_config
    from training.data import read_rows
    from training.evaluation import answer_counts
    from training.trainer import BASELINE_TRAIN_ROWS, Pretrainer, task_stream_spec

    raw = learning_config(tiny_cache, str(tmp_path / "run"))
    raw["tasks"] = {"austen_mlm": {"batch_size": 8}, "emoji_captioning": {"batch_size": 8}}
    raw["data"]["word_prior"] = word_prior
    trainer = Pretrainer(parse_config(raw))
    bias = trainer.accelerator.unwrap_model(trainer.model).word_bias.bias.detach()
    families = trainer.model_config.task_families
    vocabulary = trainer.ctx.vocabulary
    if not word_prior:
        assert not bias.any()
        return
    for name, family in (("austen_mlm", "mlm"), ("emoji_captioning", "captioning")):
        task, config = trainer.tasks[name], trainer.config.tasks[name]
        rows = read_rows(task_stream_spec(name, config, trainer.data_dir, trainer.manifest, "train"), BASELINE_TRAIN_ROWS)
        counts = answer_counts(task, rows, trainer.ctx).double()
        row = bias[families.index(family)].double()
        expected = (counts + 0.5).log()
        torch.testing.assert_close(row[vocabulary] - row[vocabulary][0], expected - expected[0], rtol=0, atol=1e-5)
        assert int(row[vocabulary].argmax()) == int(counts.argmax()) == trainer.trivial_baselines()[name]["answer"]
        outside = torch.ones(bias.shape[1], dtype=torch.bool)
        outside[vocabulary] = False
        assert not row[outside].any()
    assert not bias[families.index("image_classification")].any()


def test_trivial_baseline_is_the_most_frequent_training_answer(tiny_cache):
    from modeling_uniperceiver_moe import UniPerceiverMoEProcessor
    from training.evaluation import answer_counts, trivial_baseline
    from training.tasks import TaskContext, build_batch, get_task

    with open(os.path.join(tiny_cache, "tiny", "manifest.json")) as handle:
        manifest = json.load(handle)
    config = tiny_config("attribute")
    processor = UniPerceiverMoEProcessor.build(image_size=config.image_size)
    task = get_task("fashion_mnist_classification")
    ctx = TaskContext(processor.tokenizer, processor.image_processor, config,
                      label_names={task.name: manifest["sources"]["fashion_mnist"]["label_names"]},
                      vocabulary=torch.tensor(manifest["vocabulary"][:256]))
    train = [{"key": f"r{i}", "image": _png(), "label": label} for i, label in enumerate([3, 3, 3, 1, 2])]
    held_out = [{"key": f"e{i}", "image": _png(), "label": label} for i, label in enumerate([3, 1, 1, 1])]
    result = trivial_baseline(task, answer_counts(task, train, ctx), held_out, ctx)
    assert result == {"metric": "accuracy", "value": 0.25, "answer": 3}
    mlm = get_task("austen_mlm")
    rows = [{"key": f"t{i}", "text": text} for i, text in enumerate(["the cat and the dog", "the end of it"])]
    labels = torch.cat([build_batch(mlm, rows[i:i + 1], ctx, epoch=0).labels.reshape(-1) for i in range(2)])
    labels = labels[labels != -100]
    result = trivial_baseline(mlm, answer_counts(mlm, rows, ctx), rows, ctx)
    assert result["answer"] == int(torch.bincount(labels).argmax())
    assert result["value"] == pytest.approx(float((labels == result["answer"]).float().mean()))
    retrieval = trivial_baseline(get_task("emoji_retrieval"), None, [{"key": "a", "image": _png(), "caption": "x"},
                                                                   {"key": "b", "image": _png(), "caption": "y"}], ctx)
    assert retrieval["value"] == 0.5


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_baselines_script_trains_plain_models_the_same_way(tiny_cache, tmp_path, capsys):
    """`training.baselines`: each plain model gets exactly the steps its task got in the run, and the
    comparison lists the model, the plain model and the trivial baseline of every task."""
    import yaml

    from training import baselines

    config = learning_config(tiny_cache, str(tmp_path / "run"))
    config["train"].update(max_steps=6, eval_every=3)
    config["tasks"] = {"fashion_mnist_classification": {"batch_size": 8}, "austen_mlm": {"batch_size": 8},
                       "wordnet_lexname_classification": {"batch_size": 8}, "emoji_retrieval": {"batch_size": 8}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = baselines.main(["--config", str(path)])
    rows = {row["task"]: row for row in result["rows"]}
    assert set(rows) == set(config["tasks"])
    assert {name: p["model"] for name, p in result["plain"].items()} == {
        "fashion_mnist_classification": "ViTForImageClassification", "austen_mlm": "BertForMaskedLM",
        "wordnet_lexname_classification": "BertForSequenceClassification"}
    steps = {name: p["steps"] for name, p in result["plain"].items()}
    drawn = [json.loads(line)["task"] for line in open(tmp_path / "run" / "metrics.jsonl") if '"task"' in line]
    assert steps == {name: drawn.count(name) for name in steps}
    assert rows["emoji_retrieval"]["plain"] is None and rows["emoji_retrieval"]["trivial"] > 0
    assert (tmp_path / "run" / "baselines" / "comparison.md").read_text().count("|") > 20
    again = baselines.main(["--config", str(path), "--skip-model"])  # compares with the run already there
    assert again["rows"][0]["model"] == result["rows"][0]["model"]

    # the plain baselines alone in another directory, then compared with the run without training anything
    alone = baselines.main(["--config", str(path), "--plain-only", "--set", f"output_dir={tmp_path / 'plain'}"])
    assert all(row["model"] is None for row in alone["rows"])
    assert "Baselines only" in (tmp_path / "plain" / "baselines" / "comparison.md").read_text()
    assert {n: p["accuracy"] for n, p in alone["plain"].items()} == {n: p["accuracy"] for n, p in result["plain"].items()}
    combined = baselines.main(["--config", str(path), "--skip-model", "--plain-from", str(tmp_path / "plain")])
    assert combined["rows"] == result["rows"]
    with pytest.raises(SystemExit):  # baselines trained with another learning rate are refused
        baselines.main(["--config", str(path), "--skip-model", "--plain-from", str(tmp_path / "plain"),
                        "--set", "optim.lr=1.0e-2"])
    assert "different settings (optim.lr)" in capsys.readouterr().err


def test_candidate_spread_reports_the_word_features_of_a_new_and_a_saved_model(tiny_cache, tmp_path):
    """`benchmarks.candidate_spread`: the pairwise cosine of the MLM candidate words' features, for a new
    model and for a saved one; the saved copy of the same weights gives the same numbers."""
    import yaml

    from benchmarks import candidate_spread
    from training.config import parse_config
    from training.trainer import Pretrainer

    config = learning_config(tiny_cache, str(tmp_path / "run"))
    config["tasks"] = {"austen_mlm": {"batch_size": 4}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    Pretrainer(parse_config(config)).model.save_pretrained(tmp_path / "saved")
    rows = candidate_spread.main(["--config", str(path), "--model", str(tmp_path / "saved")])
    assert len(rows) == 2
    assert -1.0 < rows[0]["mean_cosine"] < 0.99 and rows[0]["std_cosine"] > 0  # distinct words, distinct features
    assert rows[1]["mean_cosine"] == pytest.approx(rows[0]["mean_cosine"], abs=1e-6)  # same seed, same weights
    assert rows[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)


@torch.no_grad()
def neighbour_and_far_influence(text_distance_bias: str) -> tuple[float, float]:
    """How much the output at a hidden word (position 10 of 24, an [SPE]) moves when its neighbour (9) or a
    distant word (22) is replaced, averaged over 16 random texts, in a 4-head model at initialisation."""
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(
        "none", hidden_size=64, num_attention_heads=4, text_distance_bias=text_distance_bias)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (16, 24), generator=g)
    ids[:, 10] = model.config.spe_token_id

    def hidden_word(tokens):
        return model.uniperceiver(input_ids=tokens).last_hidden_state[:, 1 + 10]  # after the leading SPE

    base = hidden_word(ids)
    moved = []
    for position in (9, 22):
        changed = ids.clone()
        changed[:, position] = torch.randint(0, 49408, (16,), generator=g)
        moved.append((hidden_word(changed) - base).norm(dim=-1).mean().item())
    return moved[0], moved[1]


def test_text_distance_bias_lets_a_hidden_word_read_its_neighbours_at_init():
    """Why masked-language modelling leaves its most-frequent-word plateau sooner with the ALiBi bias
    (docs/results.md): at initialisation a hidden word's output already depends on the word next to it far
    more than on a distant one; without the bias both count about the same."""
    near, far = neighbour_and_far_influence("alibi")
    assert near > 2.0 * far, (near, far)
    near, far = neighbour_and_far_influence("none")
    assert 0.5 * far < near < 2.0 * far, (near, far)
