"""Pre-training: data builder, task registry, streams, config errors, resumption and 1 vs 2 processes."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from training import build_data
from training.config import ConfigError, load_config, parse_config
from training.data import EmptyDatasetError, MultiTaskLoader, StreamSpec, TaskEntry, TaskStream
from training.tasks import (TASKS, MalformedSample, Task, TaskContext, build_batch, get_task, register, task_label_names,
                            task_loss)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TASKS = ["fashion_mnist_classification", "video_clip_classification", "austen_mlm", "emoji_captioning",
              "emoji_retrieval", "wordnet_lexname_classification"]


def run_config(cache: str, output_dir: str, **train) -> dict:
    """A 2-layer, 32-wide attribute-MoE run over six tasks of four families; no randomness but the data's."""
    return {
        "output_dir": output_dir, "seed": 3,
        "model": {"model_size": None, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 16, "patch_size": 8, "num_frames": 4, "max_position_embeddings": 40,
                  "moe_routing": "attribute", "moe_num_experts": 4, "moe_layers": "all", "moe_router_noise_std": 0.0,
                  "drop_path_rate": 0.0, "layer_scale_init": 0.1},
        "data": {"cache_dir": cache, "slice": "tiny", "build": False, "shuffle_block": 16, "vocabulary_size": 256,
                 "eval_samples": 16},
        "optim": {"lr": 3e-3, "grad_clip": 1.0},
        "train": {"max_steps": 6, "warmup_steps": 2, "log_every": 3, "eval_every": 0, "save_every": 2,
                  "tracker": None, **train},
        "tasks": {name: {"batch_size": 8} for name in TEST_TASKS},
    }


def launch(config: dict, path: str, processes: int = 1, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env_extra or {}))
    if processes == 1:
        command = [sys.executable, "-m", "training.pretrain", "--config", path]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", "29533", "-m", "training.pretrain", "--config", path]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def step_losses(output_dir: str) -> dict[int, float]:
    """Per-step training losses of metrics.jsonl (the last record of a step wins, as after a resume)."""
    losses = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        for line in handle:
            row = json.loads(line)
            if "loss" in row and "task" in row:
                losses[row["step"]] = row["loss"]
    return losses


def step_tasks(output_dir: str) -> dict[int, str]:
    """Per-step task of metrics.jsonl (process 0's)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return {row["step"]: row["task"] for row in rows if "loss" in row and "task" in row}


def step_rates(output_dir: str) -> dict[int, float]:
    """Per-step learning rates of metrics.jsonl (the last record of a step wins)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return {row["step"]: row["lr"] for row in map(json.loads, handle) if "lr" in row and "task" in row}


# --------------------------------------------------------------------------------------------- data builder
def test_builder_is_deterministic_and_documents_each_source(tmp_path):
    first = build_data.build_slice("tiny", str(tmp_path / "a"), ["wordnet", "fashion_mnist"], progress=False)
    second = build_data.build_slice("tiny", str(tmp_path / "b"), ["wordnet", "fashion_mnist"], progress=False)
    a = json.load(open(os.path.join(first, "manifest.json")))
    b = json.load(open(os.path.join(second, "manifest.json")))
    assert a == b
    for name, entry in a["sources"].items():
        assert entry["licence"] and entry["how"]
        for split in entry["splits"].values():
            for f in split["files"]:
                assert build_data.sha256_file(os.path.join(first, f["path"])) == f["sha256"]
    assert len(a["sources"]["wordnet"]["label_names"]) == 45  # WordNet's lexicographer files
    assert a["sources"]["fashion_mnist"]["splits"]["train"]["rows"] == 256
    assert len(a["vocabulary"]) > 100 and len(set(a["vocabulary"])) == len(a["vocabulary"])


def test_unknown_slice_or_source_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown slice 'huge'"):
        build_data.build_slice("huge", str(tmp_path))
    with pytest.raises(ValueError, match="unknown data sources \\['imagenet'\\]"):
        build_data.build_slice("tiny", str(tmp_path), ["imagenet"])


def test_tiny_slice_holds_real_data(tiny_cache):
    manifest = json.load(open(os.path.join(tiny_cache, "tiny", "manifest.json")))
    assert set(manifest["sources"]) == set(build_data.SOURCES)
    emoji = StreamSpec(files=[os.path.join(tiny_cache, "tiny", f["path"])
                              for f in manifest["sources"]["emoji"]["splits"]["train"]["files"]])
    from training.data import read_rows

    rows = read_rows(emoji, 5)
    assert all(r["caption"] and r["image"]["bytes"][:4] == b"\x89PNG" for r in rows)
    assert manifest["sources"]["video_clips"]["label_names"][1].endswith("played backwards")


# --------------------------------------------------------------------------------------------- task registry
@pytest.fixture(scope="module")
def context(tiny_cache):
    from modeling_uniperceiver_moe import UniPerceiverMoEProcessor

    config = parse_config(run_config(tiny_cache, "unused"))
    from training.trainer import build_model_config

    model_config = build_model_config(config)
    processor = UniPerceiverMoEProcessor.build(image_size=model_config.image_size)
    manifest = json.load(open(os.path.join(tiny_cache, "tiny", "manifest.json")))
    labels = {n: task_label_names(t, manifest["sources"]) for n, t in TASKS.items()}
    labels = {n: names for n, names in labels.items() if names}
    ctx = TaskContext(processor.tokenizer, processor.image_processor, model_config, label_names=labels,
                      vocabulary=torch.tensor(manifest["vocabulary"][:256]))
    return ctx, manifest


def rows_of(tiny_cache, manifest, task_name, count=4, split="train"):
    from training.data import read_rows

    template = get_task(task_name).template
    if template is not None:  # a prompted task bundles no rows: sentences in its columns
        return [{**{column: f"Sentence {row} of column {column}." for column in template.columns},
                 "label": row % len(template.label_words)} for row in range(count)]
    source = get_task(task_name).source
    files = [os.path.join(tiny_cache, "tiny", f["path"]) for f in manifest["sources"][source]["splits"][split]["files"]]
    return read_rows(StreamSpec(files=files), count)


def test_the_trainers_candidates_hold_the_end_token_so_every_caption_ends_with_an_answer(tiny_cache, context):
    """With `data.end_token_candidate` (the default) the frequent vocabulary keeps its size and makes the end
    token a candidate: a caption's last query has the end as its answer, so generation can learn to stop.
    Without it the end token is no candidate and its label is ignored (-100)."""
    from types import SimpleNamespace

    from training.trainer import Pretrainer, build_model_config

    ctx, manifest = context
    config = parse_config(run_config(tiny_cache, "unused"))
    model_config = build_model_config(config)
    eos = model_config.eos_token_id
    trainer = SimpleNamespace(config=config, manifest=manifest, model_config=model_config, data_dir=tiny_cache)
    vocabulary = Pretrainer.candidate_vocabulary(trainer)
    assert vocabulary.tolist() == manifest["vocabulary"][:255] + [eos]
    config.data.end_token_candidate = False
    assert Pretrainer.candidate_vocabulary(trainer).tolist() == manifest["vocabulary"][:256]

    task = get_task("emoji_captioning")
    rows = rows_of(tiny_cache, manifest, task.name, count=6)
    for candidates, end_label in ((vocabulary, 255), (torch.tensor(manifest["vocabulary"][:256]), -100)):
        words = TaskContext(ctx.tokenizer, ctx.image_processor, ctx.model_config, vocabulary=candidates)
        batch = build_batch(task, rows, words, epoch=0)
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        last = mask.sum(1) - 1
        assert (ids[torch.arange(len(ids)), last] == eos).all()
        assert (batch.labels[torch.arange(len(ids)), last] == end_label).all()


def test_captioning_word_accuracy_and_its_baseline_leave_the_end_answers_out(tiny_cache, context):
    """With the end token among the candidates, captioning also reports `word_accuracy` over its other
    answers (each scored by the top candidate other than the end), beside the most frequent word's share of
    them (`word_value`). A model that ranks the end first and one word second everywhere scores the end's
    share on token accuracy and that word's share on words; a model that answers right scores 1."""
    from training.evaluation import answer_counts, evaluate_task, trivial_baseline
    from training.tasks import frequent_candidates

    ctx, manifest = context
    vocabulary = frequent_candidates(manifest["vocabulary"], 256, ctx.model_config.eos_token_id)
    words = TaskContext(ctx.tokenizer, ctx.image_processor, ctx.model_config, vocabulary=vocabulary)
    task = get_task("emoji_captioning")
    rows = rows_of(tiny_cache, manifest, task.name, count=12)
    answers = build_batch(task, rows, words, epoch=0).labels
    answers = answers[answers != -100]
    end_share = float((answers == 255).float().mean())

    others = torch.bincount(answers[answers != 255], minlength=256)
    second = int(others.argmax())  # ranked second everywhere: the most frequent word, so words score its share

    def scripted(pick):
        def answer(batch):
            labels = batch.labels.reshape(-1)
            logits = torch.zeros(len(labels), len(vocabulary))
            logits[:, second] = 0.5
            logits[torch.arange(len(labels)), pick(labels).clamp(min=0)] = 1.0
            return logits, labels
        return answer

    always_end = evaluate_task(torch.nn.Identity(), task, rows, words, "cpu", answers=scripted(lambda l: l * 0 + 255))
    assert always_end["token_accuracy"] == pytest.approx(end_share)
    assert always_end["word_accuracy"] == pytest.approx(float(others[second] / others.sum()))
    assert always_end["word_accuracy"] > 0
    right = evaluate_task(torch.nn.Identity(), task, rows, words, "cpu", answers=scripted(lambda l: l))
    assert right["token_accuracy"] == 1.0 and right["word_accuracy"] == 1.0

    baseline = trivial_baseline(task, answer_counts(task, rows, words), rows, words)
    assert baseline["answer"] == 255 and baseline["value"] == pytest.approx(end_share)
    assert baseline["word_value"] == pytest.approx(float(others.max() / others.sum()))
    without_end = TaskContext(ctx.tokenizer, ctx.image_processor, ctx.model_config,
                              vocabulary=torch.tensor(manifest["vocabulary"][:256]))
    assert "word_accuracy" not in evaluate_task(torch.nn.Identity(), task, rows, without_end, "cpu",
                                                answers=scripted(lambda l: l))


@pytest.mark.parametrize("routing", ["attribute", "none"])
def test_evaluation_reports_how_an_moe_model_spreads_a_task_over_its_experts(routing, tiny_cache, context):
    """An MoE model's evaluation adds `expert_entropy` (the first batch's input pass: 1 = every expert alike,
    the shares' entropy over log E); a dense model has no experts and reports none."""
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from training.evaluation import evaluate_task, expert_entropy, task_expert_shares

    ctx, manifest = context
    config = ctx.model_config.__class__.from_dict({**ctx.model_config.to_dict(), "moe_routing": routing})
    model = UniPerceiverMoEForGenericPerception(config).eval()
    task = get_task("fashion_mnist_classification")
    rows = rows_of(tiny_cache, manifest, task.name)
    metrics = evaluate_task(model, task, rows, ctx, "cpu")
    if routing == "none":
        assert "expert_entropy" not in metrics
        return
    shares = task_expert_shares(model, build_batch(task, rows, ctx, epoch=0))
    assert metrics["expert_entropy"] == pytest.approx(expert_entropy(shares)) and 0.0 < metrics["expert_entropy"] < 1.0


def test_a_batch_moved_to_an_accelerator_keeps_its_route_inputs_on_the_host(tiny_cache, context):
    """The model groups host route keys without reading the accelerator back, so `TaskBatch.to` leaves them on
    the host (the meta device stands in for a GPU) and moves everything else."""
    from training.tasks import HOST_ROUTE_INPUTS

    ctx, manifest = context
    task = get_task("emoji_retrieval")
    batch = build_batch(task, rows_of(tiny_cache, manifest, task.name), ctx, epoch=0)
    moved = batch.to("meta")
    kept = {k for k, v in moved.inputs.items() if torch.is_tensor(v) and v.device.type == "cpu"}
    assert kept == set(HOST_ROUTE_INPUTS) and moved.labels.is_meta
    assert all(moved.inputs[k] is batch.inputs[k] for k in HOST_ROUTE_INPUTS)


@pytest.mark.parametrize("name", ["fashion_mnist_classification", "video_clip_classification", "emoji_captioning",
                                  "openclipart_retrieval"])
def test_uint8_pixels_normalised_after_the_copy_are_the_image_processor_s_floats(name, tiny_cache, context):
    """`pixel_transport="uint8"` hands over the resized 8-bit pixels (a quarter of the bytes) and `TaskBatch.to`
    normalises them: the model gets exactly the floats the image processor gives, images and clips alike,
    also after pinning (which keeps what `to` needs) and through a data worker process."""
    from dataclasses import replace

    from training.data import ProcessPrefetcher

    ctx, manifest = context
    as_bytes = replace(ctx, pixel_transport="uint8")
    task = get_task(name)
    rows = rows_of(tiny_cache, manifest, name)
    floats = build_batch(task, rows, ctx, epoch=0)
    eight_bit = build_batch(task, rows, as_bytes, epoch=0)
    assert floats.pixel_table is None and floats.inputs["pixel_values"].dtype == torch.float32
    assert eight_bit.inputs["pixel_values"].dtype == torch.uint8
    assert eight_bit.inputs["pixel_values"].shape == floats.inputs["pixel_values"].shape
    moved = eight_bit.to("cpu")
    assert moved.pixel_table is None and moved.inputs["pixel_values"].dtype == torch.float32
    assert torch.equal(moved.inputs["pixel_values"], floats.inputs["pixel_values"])
    assert torch.equal(moved.to("cpu").inputs["pixel_values"], floats.inputs["pixel_values"])  # normalised once
    if name == "fashion_mnist_classification":
        loader = MultiTaskLoader([TaskEntry(task, 1.0, 4, ListStream(rows_of(tiny_cache, manifest, name, 8)))],
                                 as_bytes, seed=0)
        prefetcher = ProcessPrefetcher(loader, 0, depth=2)
        try:
            handed = prefetcher.get(0)
        finally:
            prefetcher.close()
        assert handed.inputs["pixel_values"].dtype == torch.uint8 and handed.pixel_table is not None
        reference = MultiTaskLoader([TaskEntry(task, 1.0, 4, ListStream(rows_of(tiny_cache, manifest, name, 8)))],
                                    ctx, seed=0).batch(0)
        assert torch.equal(handed.to("cpu").inputs["pixel_values"], reference.inputs["pixel_values"])


def test_normalising_pixels_looks_each_channel_s_level_up_and_names_what_it_got_when_not_8_bit():
    from training.tasks import normalise_pixels

    table = torch.stack([torch.arange(256.0), -torch.arange(256.0), torch.full((256,), 0.5)])
    pixels = torch.tensor([[[[0, 255]], [[7, 1]], [[3, 3]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    assert normalise_pixels(pixels, table).tolist() == [[[[0.0, 255.0]], [[-7.0, -1.0]], [[0.5, 0.5]]]]
    with pytest.raises(ValueError, match=r"expected uint8 pixels \[\.\.\., 3, H, W\], got torch.float32"):
        normalise_pixels(torch.zeros(1, 3, 2, 2), table)
    with pytest.raises(ValueError, match=r"got torch.uint8 \(1, 1, 2, 2\)"):
        normalise_pixels(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), table)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_builds_inputs_targets_and_a_loss(name, tiny_cache, context):
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

    ctx, manifest = context
    task = get_task(name)
    batch = build_batch(task, rows_of(tiny_cache, manifest, name), ctx, epoch=0)
    assert batch.num_samples == 4 and not batch.skipped
    attrs = batch.inputs["attribute_vectors"]
    if task.family == "captioning":  # two segments: image tokens, then words + placeholders
        assert attrs.dim() == 3 and attrs[0, 0].tolist() == [1, 1, 0, 1, 1, 0, 0, 0]
        assert attrs[0, -1].tolist() == [1, 1, 0, 1, 0, 1, 0, 1]
    else:
        assert attrs[0].tolist() == task.input_attributes.to_list()
    assert batch.inputs["target_attribute_vectors"][0].tolist() == task.target_attributes.to_list()
    assert (batch.inputs["task_ids"] == task.task_id).all()
    model = UniPerceiverMoEForGenericPerception(ctx.model_config)
    out = model(**batch.inputs, task_family=task.family)
    loss = task_loss(batch, out, 0.1)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.logit_scales.log_scale.grad[model.logit_scales.family_index(task.family)] != 0


def test_text_length_buckets():
    from training.tasks import bucket_length

    assert [bucket_length(n, 32) for n in (1, 8, 9, 16, 17, 31, 32)] == [8, 8, 16, 16, 32, 32, 32]
    assert bucket_length(20, 24) == 24 and bucket_length(40, 32) == 40  # capped, never below the text


@pytest.mark.parametrize("name", ["austen_mlm", "emoji_captioning", "openclipart_retrieval",
                                  "wordnet_lexname_classification"])
def test_stored_token_ids_build_the_batches_the_tokenizer_builds(name, tiny_cache, context, reference_text_context):
    """The slice stores each text's token ids (`<column>_token_ids`); packed into a batch they give exactly
    the tensors that tokenising the texts gives, with and without a start token and when the texts are cut
    to `max_text_length`. Rows without the ids, or ids of another tokenizer (another fingerprint in the
    manifest), are tokenised."""
    import dataclasses

    from training.tasks import stored_token_id_tasks

    task = get_task(name)
    for ctx, manifest in (context, reference_text_context):
        rows = rows_of(tiny_cache, manifest, name, 12)
        assert all(f"{task.text_column}_token_ids" in row for row in rows)
        assert stored_token_id_tasks([name], manifest, ctx.tokenizer) == {name}
        assert stored_token_id_tasks([name], {**manifest, "token_ids_tokenizer": "another"}, ctx.tokenizer) == set()
        for length in (32, 6):
            tokenised = dataclasses.replace(ctx, max_text_length=length, _cache={})
            stored = dataclasses.replace(tokenised, token_id_tasks=frozenset([name]), _cache={})
            assert stored.stored_token_ids(task, rows) is not None and tokenised.stored_token_ids(task, rows) is None
            without = [{k: v for k, v in row.items() if not k.endswith("_token_ids")} for row in rows]
            assert stored.stored_token_ids(task, without) is None
            expected = build_batch(task, rows, tokenised, epoch=1, training=True)
            for got in (build_batch(task, rows, stored, epoch=1, training=True),
                        build_batch(task, without, stored, epoch=1, training=True)):
                assert got.inputs.keys() == expected.inputs.keys() and torch.equal(got.labels, expected.labels)
                for key, value in expected.inputs.items():
                    if torch.is_tensor(value):
                        assert torch.equal(got.inputs[key], value), (name, length, key)


def test_compile_is_on_for_cuda_by_default_and_its_padding_follows(tiny_cache, tmp_path):
    """`train.compile: auto` (the default) compiles on a CUDA device only; `data.text_padding: auto` (the
    default) pads to buckets when the run compiles, to the longest text otherwise; explicit values win,
    and anything but auto/true/false is refused when the config is read."""
    from training.config import compiles, text_padding

    config = parse_config(run_config(tiny_cache, str(tmp_path)))
    assert config.train.compile == "auto" and config.data.text_padding == "auto"
    assert compiles(config, "cuda") and not compiles(config, "cpu")
    assert text_padding(config, compiled=True) == "buckets" and text_padding(config, compiled=False) == "longest"
    for setting, on_cuda in ((True, True), (False, False)):
        explicit = parse_config(run_config(tiny_cache, str(tmp_path), compile=setting))
        assert compiles(explicit, "cuda") is on_cuda and compiles(explicit, "cpu") is setting
    raw = run_config(tiny_cache, str(tmp_path))
    raw["data"]["text_padding"] = "longest"
    assert text_padding(parse_config(raw), compiled=True) == "longest"
    with pytest.raises(ConfigError, match="train.compile must be one of"):
        parse_config(run_config(tiny_cache, str(tmp_path), compile="sometimes"))


def test_training_pixels_travel_as_bytes_to_a_cuda_device_only_by_default(tiny_cache, tmp_path):
    """`data.pixel_transport: auto` (the default) hands uint8 pixels to a CUDA device (pinned and copied there)
    and floats elsewhere; explicit values win; an unknown one is refused when the config is read."""
    from training.config import pixel_transport

    raw = run_config(tiny_cache, str(tmp_path))
    config = parse_config(raw)
    assert config.data.pixel_transport == "auto"
    assert pixel_transport(config, "cuda") == "uint8" and pixel_transport(config, "cpu") == "float32"
    raw["data"]["pixel_transport"] = "float32"
    assert pixel_transport(parse_config(raw), "cuda") == "float32"
    raw["data"]["pixel_transport"] = "uint16"
    with pytest.raises(ConfigError, match="data.pixel_transport must be one of"):
        parse_config(raw)


def test_the_trainer_s_workers_hand_batches_over_packed_unless_told_otherwise(tiny_cache, tmp_path, monkeypatch):
    """`data.batch_transport: packed` (the default) has the worker processes hand each batch over as one buffer,
    `tensors` tensor by tensor; an unknown value is refused when the config is read."""
    import training.trainer as trainer_module

    raw = run_config(tiny_cache, str(tmp_path / "run"))
    assert parse_config(raw).data.batch_transport == "packed"
    raw["data"]["batch_transport"] = "pickled"
    with pytest.raises(ConfigError, match="data.batch_transport must be one of"):
        parse_config(raw)
    asked = []
    monkeypatch.setattr(trainer_module, "start_prefetcher", lambda *args, **kwargs: asked.append(kwargs["packed"]))
    for transport in ("packed", "tensors"):
        raw["data"]["batch_transport"] = transport
        trainer_module.Pretrainer(parse_config(raw)).start_prefetcher()
    assert asked == [True, False]


def test_cuda_graph_recordings_are_counted_from_torch_compile_s_recording_callbacks():
    """`CudaGraphRecordings` counts each CUDA graph recording torch.compile announces (one start and one end
    callback around it), with its time, and nothing else the callbacks announce (a dynamo compilation)."""
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    from training.trainer import CudaGraphRecordings

    assert CudaGraphRecordings.count() and CudaGraphRecordings.count()  # once per process, however often asked
    recorded, seconds = CudaGraphRecordings.reading()
    for trigger in (CallbackTrigger.CUDAGRAPH_RECORDING, CallbackTrigger.DYNAMO, CallbackTrigger.CUDAGRAPH_RECORDING):
        with callback_handler.install_callbacks(trigger, "0/0"):
            pass
    now_recorded, now_seconds = CudaGraphRecordings.reading()
    assert now_recorded == recorded + 2 and now_seconds >= seconds


def test_masked_word_spans_match_a_token_by_token_reading():
    """The vectorised word split of `masked_word_spans` chooses the same spans, from the same random draws,
    as reading the sequence token by token (a word ends at a word-end token or before the end token)."""
    import numpy as np

    from training.tasks import masked_word_spans

    def token_by_token(ids, word_end, probability, rng, first):
        words, start = [], first
        for position in range(first, len(ids) - 1):
            if word_end[ids[position]] or position == len(ids) - 2:
                words.append((start, position + 1))
                start = position + 1
        if not words:
            return []
        count = max(1, int(round(probability * len(words))))
        chosen = rng.choice(len(words), size=min(count, len(words)), replace=False)
        return [words[w] for w in sorted(chosen)]

    draw = np.random.default_rng(0)
    word_end = draw.random(50) < 0.4
    for case in range(300):
        ids = draw.integers(0, 50, size=int(draw.integers(0, 20))).tolist()
        first, probability = int(draw.integers(0, 2)), float(draw.choice([0.15, 0.5, 0.9]))
        expected = token_by_token(ids, word_end, probability, np.random.default_rng(case), first)
        got = masked_word_spans(ids, torch.from_numpy(word_end), probability, np.random.default_rng(case), first)
        assert got == expected, (ids, first, probability)


@pytest.mark.parametrize("name", ["austen_mlm", "emoji_captioning", "emoji_retrieval", "wordnet_lexname_classification",
                                  "fashion_mnist_classification"])
def test_bucketed_text_padding_changes_shapes_not_the_loss(name, tiny_cache, context):
    """data.text_padding=buckets pads a batch's texts (and MLM's query slots) to 8, 16, 32, ...: the padding
    is masked, so the model's loss is the one of the batch padded to its longest text."""
    import dataclasses

    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

    ctx, manifest = context
    bucketed = dataclasses.replace(ctx, text_padding="buckets")
    task, rows = get_task(name), rows_of(tiny_cache, manifest, name, 6)
    longest, padded = build_batch(task, rows, ctx, epoch=0), build_batch(task, rows, bucketed, epoch=0)
    for key in [k for k in ("input_ids", "target_input_ids") if k in padded.inputs]:
        if key == "target_input_ids" and task.family != "retrieval":
            assert torch.equal(padded.inputs[key], longest.inputs[key])  # class names and words: fixed per task
            continue
        length = padded.inputs[key].shape[1]
        assert length in (8, 9, 16, 17, 32) and length >= longest.inputs[key].shape[1], (key, length)
    if "query_positions" in padded.inputs and task.family == "mlm":
        assert padded.inputs["query_positions"].shape[1] in (8, 16, 32)
    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(ctx.model_config).eval()
    with torch.no_grad():
        losses = [task_loss(b, model(**b.inputs, task_family=task.family), 0.1) for b in (longest, padded)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    if name == "fashion_mnist_classification":  # no text of its own
        assert all(torch.equal(padded.inputs[k], v) for k, v in longest.inputs.items() if torch.is_tensor(v))


def test_mlm_masks_whole_words_deterministically(tiny_cache, context):
    ctx, manifest = context
    task = get_task("austen_mlm")
    rows = rows_of(tiny_cache, manifest, "austen_mlm")
    a, b = build_batch(task, rows, ctx, epoch=0), build_batch(task, rows, ctx, epoch=0)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    assert not torch.equal(a.inputs["input_ids"], build_batch(task, rows, ctx, epoch=1).inputs["input_ids"])
    word_end = ctx.word_end()
    ids, mask_id = a.inputs["input_ids"], ctx.model_config.spe_token_id  # evaluation batches: every word hidden
    for row in range(ids.shape[0]):
        masked = (ids[row] == mask_id).tolist()
        original = ctx.tokenize([rows[row]["text"]])["input_ids"][0]
        for p in range(1, len(masked) - 1):  # a masked token that does not end its word masks the next one too
            if masked[p] and not bool(word_end[original[p]]):
                assert masked[p + 1]
        assert sum(masked) >= 1


def test_mlm_training_batches_corrupt_the_chosen_words_as_the_reference(tiny_cache, context):
    """data.mlm_corruption "reference" (the default): in training batches each chosen word becomes <|spe|>
    80% of the time, random tokens 10%, stays 10%; evaluation batches hide every chosen word; "mask_token"
    hides every chosen word with [MASK]. Labels and query positions are the chosen words either way."""
    import dataclasses

    ctx, manifest = context
    task = get_task("austen_mlm")
    rows = rows_of(tiny_cache, manifest, "austen_mlm", 200)
    spe, mask = ctx.model_config.spe_token_id, ctx.model_config.mask_token_id
    original = ctx.tokenize([row["text"] for row in rows])["input_ids"]
    kinds = {"spe": 0, "random": 0, "kept": 0}
    batches = {}
    for training in (False, True):
        for corruption in ("reference", "mask_token"):
            batches[training, corruption] = build_batch(task, rows, dataclasses.replace(ctx, mlm_corruption=corruption),
                                                        epoch=0, training=training)
    train = batches[True, "reference"]
    for row in range(len(rows)):
        positions = [int(p) for p in train.inputs["query_positions"][row] if p >= 0]
        for other in batches.values():
            assert other.inputs["query_positions"][row].tolist() == train.inputs["query_positions"][row].tolist()
            assert torch.equal(other.labels[row], train.labels[row])
        assert all(batches[False, "reference"].inputs["input_ids"][row, p] == spe for p in positions)
        assert all(batches[True, "mask_token"].inputs["input_ids"][row, p] == mask for p in positions)
        for p in positions:
            token = int(train.inputs["input_ids"][row, p])
            kinds["spe" if token == spe else "kept" if token == int(original[row, p]) else "random"] += 1
    total = sum(kinds.values())
    assert total > 300
    assert abs(kinds["spe"] / total - 0.8) < 0.06 and 0.04 < kinds["random"] / total < 0.16
    assert 0.04 < kinds["kept"] / total < 0.16


def test_mask_probability_sets_how_many_words_mlm_masks(tiny_cache, context, tmp_path):
    """`data.mask_probability` reaches the task context: 0.5 masks far more words than the default 0.15."""
    import dataclasses

    ctx, manifest = context
    task = get_task("austen_mlm")
    rows = rows_of(tiny_cache, manifest, "austen_mlm")
    masked = {p: int((build_batch(task, rows, dataclasses.replace(ctx, mask_probability=p), epoch=0)
                      .inputs["input_ids"] == ctx.model_config.spe_token_id).sum()) for p in (0.15, 0.5)}
    assert masked[0.5] > 2 * masked[0.15]
    raw = run_config(tiny_cache, str(tmp_path))
    raw["data"]["mask_probability"] = 0.5
    from training.trainer import Pretrainer

    assert Pretrainer(parse_config(raw)).ctx.mask_probability == 0.5


@pytest.fixture(scope="module")
def reference_text_context(context):
    """The task context of a model whose texts have no start token (`bos_token_id=None`, the reference's)."""
    import copy
    import dataclasses

    ctx, manifest = context
    config = copy.deepcopy(ctx.model_config)
    config.bos_token_id = None
    return dataclasses.replace(ctx, model_config=config, _cache={}), manifest


@pytest.mark.parametrize("name", ["emoji_captioning", "emoji_retrieval", "austen_mlm", "wordnet_lexname_classification",
                                  "fashion_mnist_classification"])
def test_without_a_start_token_texts_begin_with_their_first_word(name, tiny_cache, context, reference_text_context):
    """With `bos_token_id=None` every text the batch builders make (inputs, class names, captions) is the one
    made with the start token minus that token: the same words, then <|endoftext|>."""
    (ctx, manifest), (reference, _) = context, reference_text_context
    task, bos = get_task(name), ctx.model_config.bos_token_id
    rows = rows_of(tiny_cache, manifest, name)
    with_bos, without = build_batch(task, rows, ctx, epoch=0), build_batch(task, rows, reference, epoch=0)
    for key in ("input_ids", "target_input_ids"):
        if key not in without.inputs or (key == "target_input_ids" and task.family in ("mlm", "captioning")):
            continue  # word targets are `w <|endoftext|>` either way
        ids, mask = without.inputs[key], without.inputs[key.replace("input_ids", "attention_mask")]
        assert not (ids == bos).any()
        before, before_mask = with_bos.inputs[key], with_bos.inputs[key.replace("input_ids", "attention_mask")]
        assert (before[:, 0] == bos).all()
        if task.family != "mlm":  # MLM hides words at different positions; its spans are tested below
            for row in range(ids.shape[0]):
                assert ids[row][mask[row].bool()].tolist() == before[row][before_mask[row].bool()][1:].tolist()


def test_without_a_start_token_the_first_word_is_predicted_and_can_be_masked(tiny_cache, reference_text_context):
    """Captioning: the first placeholder predicts the first word (the reference's SPE_0, which sees only the
    image); MLM: the first word may be chosen."""
    import numpy as np

    from training.tasks import masked_word_spans

    ctx, manifest = reference_text_context
    caption = build_batch(get_task("emoji_captioning"), rows_of(tiny_cache, manifest, "emoji_captioning"), ctx, epoch=0)
    first_words = caption.inputs["input_ids"][:, 0]
    assert torch.equal(caption.labels[:, 0], ctx.vocabulary_index()[first_words])
    ends = torch.ones(49411, dtype=torch.bool)  # every token is a word
    chosen = {span for seed in range(40)
              for span in masked_word_spans([320, 1125, 539, 49407], ends, 0.34, np.random.default_rng(seed), first=0)}
    assert chosen == {(0, 1), (1, 2), (2, 3)}
    chosen = {span for seed in range(40)
              for span in masked_word_spans([49406, 320, 1125, 49407], ends, 0.5, np.random.default_rng(seed))}
    assert chosen == {(1, 2), (2, 3)}


def test_adding_a_task_is_one_entry(tiny_cache, context):
    ctx, manifest = context
    name = "kjv_text_mlm_copy"
    task = register(Task(name, "mlm", "kjv", 99, 0.5, input_attributes=TASKS["kjv_mlm"].input_attributes,
                         target_attributes=TASKS["kjv_mlm"].target_attributes))
    try:
        batch = build_batch(task, rows_of(tiny_cache, manifest, "kjv_mlm"), ctx, epoch=0)
        assert (batch.labels != -100).any()
        with pytest.raises(ValueError, match="already registered"):
            register(task)
    finally:
        TASKS.pop(name)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")


def test_malformed_samples_are_reported_and_skipped_or_fatal(tiny_cache, context):
    ctx, manifest = context
    rows = rows_of(tiny_cache, manifest, "fashion_mnist_classification", 6)
    rows[1] = dict(rows[1], image={"bytes": b"not an image", "path": None})
    rows[2] = dict(rows[2], label=42)
    batch = build_batch(get_task("fashion_mnist_classification"), rows, ctx, epoch=0)
    assert batch.num_samples == 4
    reasons = dict(batch.skipped)
    assert "cannot decode image (UnidentifiedImageError)" in reasons[rows[1]["key"]] and "label 42 outside [0, 10)" in reasons[rows[2]["key"]]
    text_rows = rows_of(tiny_cache, manifest, "austen_mlm", 3)
    text_rows[0] = dict(text_rows[0], text="   ")
    assert "empty or missing text" in build_batch(get_task("austen_mlm"), text_rows, ctx, 0).skipped[0][1]

    good = rows_of(tiny_cache, manifest, "fashion_mnist_classification", 8)
    bad = [good[0], dict(good[1], image={"bytes": b"xx", "path": None})] + good[2:]
    task = get_task("fashion_mnist_classification")
    loader = MultiTaskLoader([TaskEntry(task, 1.0, 4, ListStream(bad))], ctx, seed=0, on_bad_sample="skip")
    batch = loader.batch(0)
    assert batch.num_samples == 4 and loader.skipped[0][1] == good[1]["key"]
    strict = MultiTaskLoader([TaskEntry(task, 1.0, 4, ListStream(bad))], ctx, seed=0, on_bad_sample="error")
    with pytest.raises(MalformedSample, match=f"{good[1]['key']}: cannot decode image"):
        strict.batch(0)


# --------------------------------------------------------------------------------------------- streams
def test_stream_resumes_exactly_across_epochs_and_splits_by_node(tiny_cache):
    manifest = json.load(open(os.path.join(tiny_cache, "tiny", "manifest.json")))
    files = [os.path.join(tiny_cache, "tiny", f["path"]) for f in manifest["sources"]["kjv"]["splits"]["train"]["files"]]
    spec = StreamSpec(files=files)
    stream = TaskStream("kjv", spec, seed=5, shuffle_block=32)
    first = [r["key"] for r in stream.take(200)]
    state = json.loads(json.dumps(stream.state_dict()))
    after = [r["key"] for r in stream.take(150)]  # crosses into epoch 1 (256 rows per epoch)
    assert stream.epoch == 1
    resumed = TaskStream("kjv", spec, seed=5, shuffle_block=32)
    resumed.load_state_dict(state)
    assert [r["key"] for r in resumed.take(150)] == after
    assert sorted(first + after[:56]) == sorted(r["key"] for r in TaskStream("kjv", spec, 5, 32).take(256))
    assert after[56:] != first[:94]  # epoch 1 is shuffled differently from epoch 0
    # two processes read disjoint rows whose union is what one process reads, in the same global order
    ranks = [TaskStream("kjv", spec, 5, 32, rank=r, world_size=2).take(20) for r in (0, 1)]
    interleaved = [row["key"] for pair in zip(*ranks) for row in pair]
    assert interleaved == first[:40]


def test_empty_dataset_is_a_clear_error(tmp_path):
    from datasets import Dataset

    path = str(tmp_path / "empty.parquet")
    Dataset.from_dict({"key": [], "text": []}).to_parquet(path)
    with pytest.raises(EmptyDatasetError, match="task 'x': the stream .* has no rows"):
        TaskStream("x", StreamSpec(files=[path]), seed=0, shuffle_block=4).take(1)


def test_task_of_each_step_follows_the_weights(context):
    ctx, _ = context
    entries = [TaskEntry(get_task(n), w, 8, None) for n, w in (("austen_mlm", 3.0), ("kjv_mlm", 1.0))]
    loader = MultiTaskLoader(entries, ctx, seed=0)
    picks = [loader.task_for_step(s) for s in range(4000)]
    assert picks == [loader.task_for_step(s) for s in range(4000)]
    assert 0.72 < picks.count("austen_mlm") / 4000 < 0.78
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by the 3 processes"):
        MultiTaskLoader(entries, ctx, seed=0, world_size=3)


class ListStream:
    """A stream over a fixed list of rows (`TaskStream`'s take/state_dict/epoch)."""

    epoch = 0

    def __init__(self, items):
        self.items = list(items)

    def take(self, n):
        out, self.items = self.items[:n], self.items[n:]
        return out

    def state_dict(self):
        return {"remaining": len(self.items)}


def test_worker_processes_share_the_tasks_and_keep_each_stream_s_order_past_skipped_samples(tiny_cache, context):
    """`share_tasks` gives every drawn task to exactly one worker, balancing weight x rows; with a malformed
    row skipped (on_bad_sample=skip, the task's stream supplies the replacement), two workers hand over the
    batches and loader states of one."""
    from training.data import Prefetcher, ProcessPrefetcher, share_tasks

    ctx, manifest = context
    fashion = rows_of(tiny_cache, manifest, "fashion_mnist_classification", 24)
    fashion[3] = dict(fashion[3], image={"bytes": b"xx", "path": None})
    emoji = rows_of(tiny_cache, manifest, "emoji_captioning", 24)

    def loader():
        return MultiTaskLoader([TaskEntry(get_task("fashion_mnist_classification"), 2.0, 4, ListStream(list(fashion))),
                                TaskEntry(get_task("emoji_captioning"), 1.0, 4, ListStream(list(emoji))),
                                TaskEntry(get_task("austen_mlm"), 0.0, 4, ListStream([]))], ctx, seed=1)

    assert share_tasks(loader(), 2) == [frozenset({"fashion_mnist_classification"}), frozenset({"emoji_captioning"})]
    assert share_tasks(loader(), 1) == [frozenset({"fashion_mnist_classification", "emoji_captioning"})]
    assert len(share_tasks(loader(), 8)) == 2  # never more workers than drawn tasks
    steps = range(0, 8)
    reference = Prefetcher(loader(), 0, depth=0)
    expected = [reference.get(step) for step in steps]
    shared = ProcessPrefetcher(loader(), 0, depth=2, processes=2)
    try:
        got = [shared.get(step) for step in steps]
    finally:
        shared.close()
    assert {b.task.name for b in expected} == {"fashion_mnist_classification", "emoji_captioning"}
    assert reference.loader.skipped and reference.loader.skipped[0][0] == "fashion_mnist_classification"
    assert [b.data_state for b in got] == [b.data_state for b in expected]
    for a, b in zip(got, expected):
        assert torch.equal(a.labels, b.labels) and all(
            torch.equal(a.inputs[k], v) if torch.is_tensor(v) else a.inputs[k] == v for k, v in b.inputs.items())


def test_the_worker_process_prefetches_the_thread_s_batches_and_raises_its_errors(tiny_cache, context):
    """`data.prefetch_worker=process` hands the training loop exactly the batches (tensors, tasks, loader
    states) that the thread and no prefetching give, with one worker process or with the tasks shared out
    over several (`data.prefetch_processes`), packed into one buffer or tensor by tensor, and a malformed sample under on_bad_sample=error stops it
    with the worker's error type and message."""
    from training.data import Prefetcher, ProcessPrefetcher, start_prefetcher

    ctx, manifest = context

    def loader():
        entries = []
        for name in ("fashion_mnist_classification", "austen_mlm", "emoji_captioning"):
            files = [os.path.join(tiny_cache, "tiny", f["path"])
                     for f in manifest["sources"][get_task(name).source]["splits"]["train"]["files"]]
            entries.append(TaskEntry(get_task(name), 1.0, 4, TaskStream(name, StreamSpec(files=files), 3, 16)))
        return MultiTaskLoader(entries, ctx, seed=3)

    def take(prefetcher, steps=range(2, 8)):
        try:
            return [prefetcher.get(step) for step in steps]
        finally:
            prefetcher.close()

    assert isinstance(start_prefetcher(loader(), 0, 2), ProcessPrefetcher)
    assert isinstance(start_prefetcher(loader(), 0, 2, worker="thread"), Prefetcher)
    reference = take(Prefetcher(loader(), 2, depth=0))
    packed = take(ProcessPrefetcher(loader(), 2, depth=3))
    for batch in packed:  # each batch crossed from its worker as one buffer: its tensors share one storage
        tensors = [v for v in batch.inputs.values() if torch.is_tensor(v)] + [batch.labels]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    for other in (packed, take(ProcessPrefetcher(loader(), 2, depth=3, packed=False)),
                  take(Prefetcher(loader(), 2, depth=3)), take(ProcessPrefetcher(loader(), 2, depth=3, processes=2)),
                  take(ProcessPrefetcher(loader(), 2, depth=1, processes=5))):  # one task per worker
        assert [b.task.name for b in other] == [b.task.name for b in reference]
        assert len({b.task.name for b in reference}) > 1
        for got, expected in zip(other, reference):
            assert got.inputs.keys() == expected.inputs.keys() and got.data_state == expected.data_state
            for key, value in expected.inputs.items():
                assert torch.equal(got.inputs[key], value) if torch.is_tensor(value) else got.inputs[key] == value
            assert torch.equal(got.labels, expected.labels)
    rows = rows_of(tiny_cache, manifest, "fashion_mnist_classification", 8)
    rows[5] = dict(rows[5], image={"bytes": b"xx", "path": None})
    task = get_task("fashion_mnist_classification")
    strict = MultiTaskLoader([TaskEntry(task, 1.0, 4, ListStream(rows))], ctx, seed=0, on_bad_sample="error")
    prefetcher = ProcessPrefetcher(strict, 0, depth=2)
    try:
        assert prefetcher.get(0).num_samples == 4
        with pytest.raises(MalformedSample, match=f"{rows[5]['key']}: cannot decode image"):
            prefetcher.get(1)
    finally:
        prefetcher.close()


def test_packed_tensors_come_back_equal_as_aligned_views_of_one_buffer():
    """`pack_tensors` / `unpack_tensors`: every dtype, an empty tensor, a 0-d one and a non-contiguous one come
    back equal (values, dtype, shape), each a view of the one buffer starting at a multiple of 64 bytes."""
    from training.data import PACKED_ALIGNMENT, pack_tensors, unpack_tensors

    tensors = {"float": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16),
               "long": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]),
               "uint8": torch.randint(0, 255, (2, 3, 4), dtype=torch.uint8), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5, dtype=torch.float64), "strided": torch.randn(4, 6).t()}
    buffer, slots = pack_tensors(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    back = unpack_tensors(buffer, slots)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
        assert back[name].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), name
        assert (back[name].data_ptr() - buffer.data_ptr()) % PACKED_ALIGNMENT == 0, name


def test_broadcast_views_are_packed_as_the_slice_they_repeat():
    """A tensor made by `expand` (the task registry's attribute rows) is packed as its one repeated slice and
    comes back as the same broadcast view: equal, stride 0 where it was, a few bytes in the buffer."""
    from training.data import pack_tensors, unpack_tensors
    from training.tasks import ATTRIBUTES, attribute_rows

    candidates = attribute_rows(ATTRIBUTES["word_target"], 4096)  # [4096, A]: one row for every candidate
    per_token = torch.randn(3, 8)[None].expand(5, 3, 8)  # the same rows for each of 5 sequences
    buffer, slots = pack_tensors({"candidates": candidates, "per_token": per_token, "plain": torch.ones(2, 2)})
    back = unpack_tensors(buffer, slots)
    assert torch.equal(back["candidates"], candidates) and torch.equal(back["per_token"], per_token)
    assert back["candidates"].stride(0) == 0 and back["per_token"].stride(0) == 0 and back["plain"].stride(0) == 2
    assert slots["candidates"].nbytes == candidates.shape[1] * 4 and slots["per_token"].nbytes == 3 * 8 * 4
    assert buffer.numel() == 64 + 128 + 64  # each slot rounded up to 64 bytes


def test_batches_are_pinned_in_the_training_loop_s_thread_when_asked(tiny_cache, context, monkeypatch):
    """`data.pin_memory: loop` pins each batch in the thread that takes it (`get`), with no pinning thread
    beside the workers; `thread` pins in the building thread. (`TaskBatch.pin_memory` is replaced by a
    recorder: there is no page-locked memory without a GPU.)"""
    import threading

    from training.data import PackedBatch, Prefetcher, ProcessPrefetcher
    from training.tasks import TaskBatch

    ctx, manifest = context
    rows = rows_of(tiny_cache, manifest, "fashion_mnist_classification", 16)
    pinned_by = []

    def recorded_pin(batch):
        pinned_by.append(threading.get_ident())
        return batch

    monkeypatch.setattr(TaskBatch, "pin_memory", recorded_pin)
    monkeypatch.setattr(PackedBatch, "pin_memory", recorded_pin)  # a worker's batch arrives packed

    def loader():
        return MultiTaskLoader([TaskEntry(get_task("fashion_mnist_classification"), 1.0, 4, ListStream(list(rows)))],
                               ctx, seed=0)

    def take(prefetcher, steps=range(3)):
        try:
            return [prefetcher.get(step).num_samples for step in steps]
        finally:
            prefetcher.close()

    here = threading.get_ident()
    for make in (lambda: Prefetcher(loader(), 0, depth=2, pin_memory=True, pin_in_loop=True),
                 lambda: ProcessPrefetcher(loader(), 0, depth=2, pin_memory=True, pin_in_loop=True)):
        pinned_by.clear()
        assert take(make()) == [4, 4, 4] and pinned_by == [here] * 3
    pinned_by.clear()
    assert take(Prefetcher(loader(), 0, depth=2, pin_memory=True)) == [4, 4, 4]
    assert len(pinned_by) >= 3 and here not in pinned_by  # the building thread pinned them
    pinned_by.clear()
    assert take(Prefetcher(loader(), 0, depth=2, pin_memory=False, pin_in_loop=True)) == [4, 4, 4] and not pinned_by


def test_a_step_s_results_are_read_in_one_transfer_as_they_were_when_sent():
    from training.trainer import read_step_result, send_step_result

    loss = torch.tensor(2.5)
    result = send_step_result({"task": "t", "synced": True, "loss": loss, "tokens": torch.tensor(7),
                               "grad_norm": torch.tensor(float("inf")), "skipped": torch.tensor(True)})
    loss.add_(1.0)  # later work on the device: the values were packed when the step sent them, not at the read
    read = read_step_result(result)
    assert read == {"task": "t", "synced": True, "loss": 2.5, "tokens": 7, "grad_norm": float("inf"), "skipped": True}
    assert type(read["tokens"]) is int and type(read["skipped"]) is bool
    assert read_step_result(result) == read  # the benchmark reads a result the loop has read
    unsynced = {"task": "t", "synced": False, "loss": torch.tensor(1.0), "tokens": torch.tensor(3),
                "grad_norm": None, "skipped": False}
    assert read_step_result(send_step_result(unsynced)) == dict(unsynced, loss=1.0, tokens=3)


def test_adamw_is_fused_on_cpu_unless_the_config_says_otherwise():
    from training.config import OptimConfig
    from training.trainer import make_optimizer

    model = torch.nn.Linear(4, 3)
    cpu = torch.device("cpu")
    assert make_optimizer(model, OptimConfig(), cpu).defaults["fused"] is True
    assert not make_optimizer(model, OptimConfig(fused=False), cpu).defaults["fused"]
    # the same update as the multi-tensor implementation, up to rounding
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    for parameter in twin.parameters():
        parameter.grad = torch.ones_like(parameter)
    make_optimizer(model, OptimConfig(), cpu).step()
    make_optimizer(twin, OptimConfig(fused=False), cpu).step()
    for fused, multi_tensor in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(fused, multi_tensor)


def test_reference_recipe_puts_experts_in_the_reference_layers():
    """The reference's MoE layers are 0, 2, 4, ... (its "odd" layers counted from 1); `every_other` is 1, 3, 5.
    Its stochastic depth is one rate at every layer; its images are preprocessed as its evaluation does; its texts
    have no start token and no bias between words."""
    from training.trainer import build_model_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, "training", "configs", "reference_b.yaml")
    run = load_config(path, ["train.tracker=null"])
    reference = build_model_config(run)
    assert run.data.image_preprocessing == "reference"  # ImageNet statistics, the 256/224 crop
    assert reference.moe_layer_indices() == [0, 2, 4, 6, 8, 10]
    assert reference.layer_scale_init == 1e-3 and reference.initializer_scheme == "fixed"
    assert (reference.drop_path_rate, reference.drop_path_schedule) == (0.1, "fixed")  # DROP_PATH_PROB_FIXED
    assert reference.bos_token_id is None and reference.text_distance_bias == "none"  # the reference's texts
    assert not reference.word_logit_bias
    assert run.data.candidate_vocabulary == "full" and run.data.partition_candidates  # all 49,411 words, split


def test_the_full_vocabulary_makes_every_token_a_candidate_word(tiny_cache, tmp_path):
    """`data.candidate_vocabulary: full` (the reference's MLM and caption targets): the candidates are every
    token id in order, so every hidden word is scored and is its own candidate index; training runs."""
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=1, save_every=0)
    config["model"]["max_position_embeddings"] = 40
    config["data"].update(candidate_vocabulary="full", vocabulary_size=10**6)  # the size is then unused
    config["tasks"] = {"austen_mlm": {"batch_size": 2}}
    config["data"]["eval_samples"] = 2
    from training.trainer import Pretrainer

    trainer = Pretrainer(parse_config(config))
    assert torch.equal(trainer.ctx.vocabulary, torch.arange(trainer.model_config.vocab_size))
    batch = build_batch(get_task("austen_mlm"), rows_of(tiny_cache, trainer.manifest, "austen_mlm", count=2),
                        trainer.ctx, epoch=0)
    hidden = batch.labels != -100
    assert hidden.any() and len(batch.inputs["target_input_ids"]) == 49411
    chosen = batch.inputs["query_positions"][hidden]
    rows = hidden.nonzero()[:, 0]
    originals = trainer.ctx.tokenize([row["text"] for row in rows_of(tiny_cache, trainer.manifest, "austen_mlm", 2)])
    assert torch.equal(batch.labels[hidden], originals["input_ids"][rows, chosen])  # label = the token id itself
    trainer.train()
    assert json.load(open(os.path.join(out, "report.json")))["tasks"][0]["evaluated"] > 0


# --------------------------------------------------------------------------------------------- config
def test_config_errors_name_the_field(tmp_path, tiny_cache):
    base = run_config(tiny_cache, str(tmp_path))
    for mutate, message in (
        (lambda c: c["train"].update(max_stepz=3), "train.max_stepz"),
        (lambda c: c["tasks"].update(imagenet={}), "tasks.imagenet: unknown task"),
        (lambda c: c["train"].update(mixed_precision="fp8"), "train.mixed_precision must be one of"),
        (lambda c: c["data"].update(shuffle_block="big"), "data.shuffle_block must be a number"),
        (lambda c: c.update(optimiser={}), "unknown section"),
        (lambda c: c["tasks"]["austen_mlm"].update(batch_sise=3), "tasks.austen_mlm.batch_sise"),
        (lambda c: c["data"].update(mask_probability=1.5), r"data.mask_probability must be in \(0, 1\)"),
        (lambda c: c["optim"].update(lr=float("inf")), "optim.lr must be a finite number"),
        (lambda c: c.update(output_dir=None), "output_dir must be a folder path"),
        (lambda c: c["train"].update(keep_checkpoints=0), "train.keep_checkpoints must be >= 1"),
        (lambda c: c.update(output_dir=" "), "output_dir must be a folder path"),
        (lambda c: c["tasks"]["austen_mlm"].update(loss_weight=float("nan")), "tasks.austen_mlm.loss_weight must be a finite"),
        (lambda c: c["train"].update(fsdp=True, mixed_precision="fp16"), "train.fsdp trains in bf16 or float32"),
        (lambda c: c["train"].update(fsdp=True, compile=True), "train.fsdp runs the encoder eagerly"),
    ):
        raw = json.loads(json.dumps(base))
        mutate(raw)
        with pytest.raises(ConfigError, match=message):
            parse_config(raw)
    from training.trainer import build_model_config

    raw = json.loads(json.dumps(base))
    raw["model"]["hidden_sise"] = 3
    with pytest.raises(ConfigError, match="hidden_sise"):
        build_model_config(parse_config(raw))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_config(str(path), ["train.max_steps=9"]).train.max_steps == 9
    assert load_config(os.path.join(REPO, "training", "configs", "tiny_cpu.yaml")).model["moe_routing"] == "attribute"


@pytest.mark.parametrize("override, message", [
    ("model.patch_size=0", "patch_size: must be a positive int, got 0"),
    ("model.hidden_act=foo", "hidden_act: unknown activation 'foo'"),
    ("tasks.austen_mlm.loss_weight=abc", "tasks.austen_mlm.loss_weight must be a number"),
    ("data.vocabulary_size=0", "data.vocabulary_size must be >= 1"),
    ("data.eval_samples=0", "data.eval_samples must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.max_minutes=0", "train.max_minutes must be > 0, or null for no limit"),
    ("model.text_position_init=learned", "text_position_init: must be one of"),
    ("model=[1, 2]", "section 'model' must be a mapping"),
    ("tasks=[austen_mlm]", "section 'tasks' must be a mapping"),
    ("data.max_text_length=41", "data.max_text_length=41 exceeds model.max_position_embeddings=40"),
    ("model.attribute_dim=4", "model.attribute_dim=4, but the tasks' token attributes have 8 entries"),
    ("model.moe_routing=task", None),  # the task ids of TEST_TASKS fit the default num_tasks
])
def test_type_and_cross_field_errors_are_config_errors(override, message, tiny_cache, tmp_path):
    """Each of these used to be accepted and crash mid-run (or divide by zero); now parsing and the
    model/task cross-checks refuse them, naming the field, before any work starts."""
    from training.config import apply_overrides
    from training.trainer import build_model_config

    def build():
        return build_model_config(parse_config(apply_overrides(run_config(tiny_cache, str(tmp_path)), [override])))

    if message is None:
        build()
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build()


def test_a_vocabulary_larger_than_the_slice_is_refused_before_training(tiny_cache, tmp_path):
    out = tmp_path / "run"
    config = run_config(tiny_cache, str(out))
    config["data"]["vocabulary_size"] = 10**6
    failed = launch(config, str(tmp_path / "c.yaml"))
    assert failed.returncode == 2 and "data.vocabulary_size=1000000, but the data slice" in failed.stderr
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")


# --------------------------------------------------------------------------------------------- trainer runs
def test_killed_run_resumes_with_the_same_losses(tiny_cache, tmp_path):
    straight = str(tmp_path / "straight")
    done = launch(run_config(tiny_cache, straight), str(tmp_path / "a.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = str(tmp_path / "crashed")
    config = run_config(tiny_cache, crashed)
    killed = launch(config, str(tmp_path / "b.yaml"), env_extra={"UNIPERCEIVER_TEST_CRASH_AT_STEP": "5"})
    assert killed.returncode == 17  # died abruptly after step 5; the last checkpoint is step 4
    assert sorted(os.listdir(os.path.join(crashed, "checkpoints"))) == ["step_0000002", "step_0000004"]
    resumed = launch(config, str(tmp_path / "b.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = step_losses(straight), step_losses(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    assert step_rates(straight) == step_rates(crashed)  # the schedule continues where it stopped
    with open(os.path.join(crashed, "metrics.jsonl")) as handle:  # step 5, trained twice, is logged once
        logged = [row["step"] for row in map(json.loads, handle) if "task" in row]
    assert logged == [1, 2, 3, 4, 5, 6]
    report = json.load(open(os.path.join(straight, "report.json")))
    assert {t["task"] for t in report["tasks"]} == set(TEST_TASKS)
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

    final = UniPerceiverMoEForGenericPerception.from_pretrained(os.path.join(straight, "final"))
    resumed_final = UniPerceiverMoEForGenericPerception.from_pretrained(os.path.join(crashed, "final"))
    for (name, p), (_, q) in zip(final.named_parameters(), resumed_final.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


@pytest.mark.slow  # inductor compiles a graph per task batch shape on the CPU: minutes
def test_compiled_encoder_trains_like_eager(tiny_cache, tmp_path):
    """The compiled encoder, with dynamo's automatic shapes, with static ones over bucketed text lengths
    (`data.text_padding: buckets`, `train.compile_shapes: static`) and compiled layer by layer, logs the eager
    run's losses; its first log window counts the graphs it compiled."""
    runs = {}
    for name, compiled, padding in (("eager", False, "longest"), ("compiled", True, "longest"),
                                    ("bucketed", True, "buckets"), ("per_layer", True, "buckets")):
        out = str(tmp_path / name)
        config = run_config(tiny_cache, out, compile=compiled, max_steps=3, save_every=0,
                            compile_layers_per_graph=1 if name == "per_layer" else 0,
                            compile_shapes="static" if name == "bucketed" else "auto")
        config["data"]["text_padding"] = padding
        done = launch(config, str(tmp_path / f"{name}.yaml"))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = step_losses(out)
        with open(os.path.join(out, "metrics.jsonl")) as handle:  # the warm-up's graphs, logged per window
            graphs = [row.get("compiled_graphs") for row in map(json.loads, handle) if "steps_per_second" in row]
        assert graphs[0] > 0 if compiled else graphs == [None] * len(graphs), (name, graphs)
    for name in ("compiled", "bucketed", "per_layer"):
        assert sorted(runs[name]) == sorted(runs["eager"]) == [1, 2, 3]
        for step in (1, 2, 3):
            assert runs[name][step] == pytest.approx(runs["eager"][step], rel=1e-3), (name, step)


def test_corrupt_checkpoint_files_are_named_and_the_previous_checkpoint_offered(tiny_cache, tmp_path):
    """Every checkpoint carries the sha256 of its files: a truncated optimizer.bin or a flipped bit in the
    weights is refused before loading, naming the file and the newest earlier checkpoint that verifies; a
    checkpoint without checksums still names the file that cannot be read; a missing RNG state is a loud
    warning (the run continues, not bit-exact); nothing already written is lost."""
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=6, save_every=2, keep_checkpoints=3)
    assert launch(config, str(tmp_path / "c.yaml")).returncode == 0
    step = {n: os.path.join(out, "checkpoints", f"step_000000{n}") for n in (2, 4, 6)}
    assert "model.safetensors" in json.load(open(os.path.join(step[6], "checksums.json")))
    with open(os.path.join(step[6], "optimizer.bin"), "r+b") as handle:
        handle.truncate(100)
    config["train"]["max_steps"] = 8
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"checkpoint {step[6]} cannot be used: optimizer.bin does not match its checksum" in refused.stderr
    assert f"--set train.resume={step[4]}" in refused.stderr
    os.remove(os.path.join(step[6], "checksums.json"))  # as a checkpoint of an older version
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2 and "optimizer.bin (" in refused.stderr and "cannot be read" in refused.stderr
    assert "has no checksums.json" in refused.stderr
    with open(os.path.join(step[2], "model.safetensors"), "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-8, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 1]))  # one bit of one weight: safetensors alone would load it silently
    config["train"]["resume"] = step[2]
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2 and "model.safetensors does not match its checksum" in refused.stderr
    assert "start over with --set train.resume=none" in refused.stderr  # no earlier checkpoint verifies
    os.remove(os.path.join(step[4], "random_states_0.pkl"))
    config["train"]["resume"] = step[4]
    resumed = launch(config, str(tmp_path / "c.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "WARNING: random_states_0.pkl of checkpoint" in resumed.stderr and "is missing" in resumed.stderr
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))

    from training.checkpoints import CheckpointError, check_weight_shapes
    from safetensors import safe_open

    with safe_open(os.path.join(step[4], "model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    check_weight_shapes(step[4], shapes)
    wider = dict(shapes, **{key: (shape[0] + 1, *shape[1:]) for key, shape in shapes.items() if "word_embeddings" in key})
    with pytest.raises(CheckpointError, match="model.safetensors does not fit this model .*word_embeddings"):
        check_weight_shapes(step[4], wider)


def test_a_corrupt_data_shard_is_named_before_training(tiny_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(os.path.join(tiny_cache, "tiny"), cache / "tiny")
    shard = next((cache / "tiny" / "wordnet").glob("test-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "run"
    failed = launch(run_config(str(cache), str(out)), str(tmp_path / "c.yaml"))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert f"data file {shard} of source 'wordnet' does not match the sha256" in failed.stderr
    assert "--sources wordnet --force" in failed.stderr and not os.path.exists(out / "checkpoints")


def test_building_some_sources_keeps_the_slice_s_others(tmp_path):
    """Building one source into an existing slice (as prompt tuning does) adds it and keeps the others (one of
    them without texts): the result is the slice built with all at once, byte for byte, its candidate
    vocabulary counted over the kept sources' texts too."""
    together = build_data.build_slice("tiny", str(tmp_path / "a"), ["wordnet", "fashion_mnist", "austen"],
                                      progress=False)
    build_data.build_slice("tiny", str(tmp_path / "b"), ["wordnet", "fashion_mnist"], progress=False)
    apart = build_data.build_slice("tiny", str(tmp_path / "b"), ["austen"], progress=False)
    a = json.load(open(os.path.join(together, "manifest.json")))
    b = json.load(open(os.path.join(apart, "manifest.json")))
    assert list(b["sources"]) == ["fashion_mnist", "austen", "wordnet"] and a == b
    build_data.build_slice("tiny", str(tmp_path / "b"), ["austen"], progress=False, force=True)
    assert json.load(open(os.path.join(apart, "manifest.json"))) == a  # a forced rebuild of one keeps the other


def test_ctrl_c_says_which_checkpoint_a_rerun_continues_from(tiny_cache, tmp_path):
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=6, save_every=2)
    stopped = launch(config, str(tmp_path / "c.yaml"), env_extra={"UNIPERCEIVER_TEST_INTERRUPT_AT_STEP": "3"})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "interrupted at step 3 of 6" in stopped.stderr and "Traceback" not in stopped.stderr
    assert f"Last checkpoint: {os.path.join(out, 'checkpoints', 'step_0000002')}" in stopped.stderr


def test_resume_reads_the_whole_log_back_and_drops_what_is_trained_again(tmp_path):
    """The report's history is the run's whole metrics.jsonl (not the last 1,000 entries), cut back to the
    checkpoint so the steps trained again after it appear once."""
    from types import SimpleNamespace

    from training.trainer import Pretrainer

    out = tmp_path / "run"
    (out / "checkpoints" / "step_0001500").mkdir(parents=True)
    lines = [json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 1501)]
    kept = "".join(lines).encode()
    (out / "metrics.jsonl").write_bytes(kept + b'{"step": 1501, "loss": 9.0}\n')
    fake = SimpleNamespace(config=SimpleNamespace(output_dir=str(out)),
                           accelerator=SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    history = Pretrainer._history_until(fake, str(out / "checkpoints" / "step_0001500"), {"metrics_bytes": len(kept)})
    assert [row["step"] for row in history] == list(range(1, 1501))
    assert (out / "metrics.jsonl").read_bytes() == kept


def test_a_full_disk_is_named_and_the_partial_checkpoint_removed(tmp_path, monkeypatch):
    import errno
    import shutil
    from types import SimpleNamespace

    from training.trainer import Pretrainer

    staging = tmp_path / "checkpoints" / "step_0000004.tmp"
    staging.mkdir(parents=True)
    fake = SimpleNamespace(config=SimpleNamespace(output_dir=str(tmp_path)))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1024))
    error = Pretrainer._save_failed(fake, str(staging), RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))
    assert f"no space left on the device holding {staging.parent}" in str(error) and not staging.exists()
    monkeypatch.setattr(shutil, "disk_usage", real)
    staging.mkdir()
    error = Pretrainer._save_failed(fake, str(staging), OSError(errno.ENOSPC, "No space left on device"))
    assert "no space left on the device" in str(error) and "last complete checkpoint is none" in str(error)


def test_an_empty_test_split_is_an_error_not_a_missing_report_row(tiny_cache, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"key": ["a", "b"], "text": ["one two three four", "five six seven"]}).to_parquet(
        str(tmp_path / "train.parquet"))
    Dataset.from_dict({"key": [], "text": []}).to_parquet(str(tmp_path / "test.parquet"))
    out = tmp_path / "run"
    config = run_config(tiny_cache, str(out), max_steps=1)
    config["tasks"] = {"austen_mlm": {"batch_size": 2, "source": {"files": str(tmp_path / "train.parquet"),
                                                                  "eval": {"files": str(tmp_path / "test.parquet")}}}}
    failed = launch(config, str(tmp_path / "c.yaml"))
    assert failed.returncode == 2 and "task 'austen_mlm': its test split" in failed.stderr, failed.stderr[-2000:]


def test_a_launch_whose_processes_did_not_join_is_refused(monkeypatch):
    from training.trainer import LaunchMismatch, check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchMismatch, match=r"started 2 processes .* joined 1 .* `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
        check_world_size(1, "cpu")
    check_world_size(2, "cpu")


def test_an_fsdp_launch_that_would_not_shard_is_refused(tiny_cache, tmp_path):
    """accelerate's FSDP needs GPUs: two CPU processes launched with ACCELERATE_USE_FSDP=true would run as
    plain data parallelism, each holding the whole model; `train.fsdp` in one process has nothing to shard
    over. The trainer says so before any work starts."""
    out = tmp_path / "run"
    config = run_config(tiny_cache, str(out))
    refused = launch(config, str(tmp_path / "c.yaml"), processes=2, env_extra={"ACCELERATE_USE_FSDP": "true"})
    assert refused.returncode != 0
    assert "FSDP was asked for (ACCELERATE_USE_FSDP=true), but accelerate runs this launch as MULTI_CPU" in refused.stderr
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")
    config["train"]["fsdp"] = True
    alone = launch(config, str(tmp_path / "c.yaml"))
    assert alone.returncode != 0
    assert "train.fsdp shards the model over the processes of a launch, and this run has one" in alone.stderr
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")


class _RunsCodeWhenUnpickled:
    """Unpickling this calls open(path, "w"): a file appearing at `path` means the pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_executes_a_pickle_planted_in_a_checkpoint(tiny_cache, tmp_path):
    """No checkpoint file is unpickled unsafely: checkpoints hold no scheduler pickle (the schedule is rebuilt
    from the step); a planted `custom_checkpoint_0.pkl` is refused by name, a planted `random_states_0.pkl`
    is not executed, and a planted `optimizer.bin` is refused by its checksum, or without one by the
    weights-only loader, instead of run."""
    import pickle

    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=2, save_every=2)
    assert launch(config, str(tmp_path / "c.yaml")).returncode == 0
    checkpoint = os.path.join(out, "checkpoints", "step_0000002")
    assert not [f for f in os.listdir(checkpoint) if f.startswith("custom_checkpoint")]
    marker = tmp_path / "executed"
    payload = pickle.dumps(_RunsCodeWhenUnpickled(str(marker)))
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        with open(os.path.join(checkpoint, name), "wb") as handle:
            handle.write(payload)
    config["train"]["max_steps"] = 4
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode != 0 and "holds custom_checkpoint_0.pkl" in refused.stderr
    assert not marker.exists()
    os.remove(os.path.join(checkpoint, "custom_checkpoint_0.pkl"))  # as the message says
    resumed = launch(config, str(tmp_path / "c.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and not marker.exists()
    with open(os.path.join(out, "checkpoints", "step_0000004", "optimizer.bin"), "wb") as handle:
        handle.write(payload)
    config["train"]["max_steps"] = 6
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2 and "cannot be used: optimizer.bin does not match its checksum" in refused.stderr
    os.remove(os.path.join(out, "checkpoints", "step_0000004", "checksums.json"))  # loaded without the check
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2 and "optimizer.bin (UnpicklingError" in refused.stderr
    assert not marker.exists()


@pytest.mark.parametrize("fused", [None, False], ids=["on_device", "on_host"])
def test_diverging_run_stops_with_an_error_and_keeps_its_checkpoints(fused, tiny_cache, tmp_path):
    """A learning rate of 1e30 makes the gradients non-finite within a few steps: the run stops without
    applying that step, exits non-zero naming the step and the last good checkpoint, and writes no final/.
    The fused AdamW skips the step on the device (the host reads the flag a few steps later, before any
    checkpoint); the multi-tensor one after reading the norm."""
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=6, save_every=1)
    config["optim"].update(lr=1e30, fused=fused)
    failed = launch(config, str(tmp_path / "c.yaml"))
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert "gradient norm of step" in failed.stderr and "last good checkpoint" in failed.stderr
    assert not os.path.exists(os.path.join(out, "final"))
    kept = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert kept and kept[-1] in failed.stderr
    from safetensors.torch import load_file

    weights = load_file(os.path.join(out, "checkpoints", kept[-1], "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    if fused is False:
        return
    skipping = str(tmp_path / "skip")  # train.on_non_finite=skip: steps are dropped, 10 in a row at most
    config = run_config(tiny_cache, skipping, max_steps=16, save_every=0, on_non_finite="skip")
    config["optim"]["lr"] = 1e30
    failed = launch(config, str(tmp_path / "s.yaml"))
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert "not applied (train.on_non_finite=skip)" in failed.stdout + failed.stderr
    assert "was not finite in 11 steps in a row" in failed.stderr
    with open(os.path.join(skipping, "metrics.jsonl")) as handle:
        assert sum(1 for row in map(json.loads, handle) if row.get("skipped")) == 10


def test_time_limit_says_why_it_stopped_and_resumes(tiny_cache, tmp_path):
    """Stopped by train.max_minutes after step 1 and resumed, a bf16 token-routed run logs the losses of an
    uninterrupted one (its kept expert cast must not outlive a fused AdamW step, which bumps no versions)."""
    def token_bf16(output_dir):
        config = run_config(tiny_cache, output_dir, max_steps=6, save_every=0)
        config["model"]["moe_routing"], config["train"]["mixed_precision"] = "token", "bf16"
        return config

    straight = str(tmp_path / "straight")
    assert launch(token_bf16(straight), str(tmp_path / "s.yaml")).returncode == 0
    with open(os.path.join(straight, "metrics.jsonl")) as handle:
        rows = [row for row in map(json.loads, handle) if "task" in row]
    # the routers' load-balancing and z-losses, a part of each step's loss, are logged apart
    assert len(rows) == 6 and all(0 < row["aux_loss"] < row["loss"] for row in rows)
    out = str(tmp_path / "run")
    config = token_bf16(out)
    config["train"]["max_minutes"] = 1e-6  # out of time after the first step
    stopped = launch(config, str(tmp_path / "c.yaml"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopping at step 1 of 6: train.max_minutes" in stopped.stdout
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000001"]
    report = json.load(open(os.path.join(out, "report.json")))
    assert (report["steps"], report["max_steps"]) == (1, 6)  # the sweeps resume a run whose report says so
    config["train"]["max_minutes"] = None
    resumed = launch(config, str(tmp_path / "c.yaml"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert step_losses(out) == step_losses(straight) and sorted(step_losses(out)) == [1, 2, 3, 4, 5, 6]
    report = json.load(open(os.path.join(out, "report.json")))
    assert (report["steps"], report["max_steps"]) == (6, 6)


def test_starting_over_moves_the_earlier_run_aside(tiny_cache, tmp_path):
    """train.resume=none into a folder holding a run: the earlier run moves to previous-run-1/ whole, the
    new run's checkpoints, metrics and final/ are its own, and a later default run resumes the new one."""
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=3, save_every=1)
    assert launch(config, str(tmp_path / "c.yaml")).returncode == 0
    first_losses = step_losses(out)
    with open(os.path.join(out, "metrics.jsonl")) as handle:  # attribute routing adds no router loss
        assert [row["aux_loss"] for row in map(json.loads, handle) if "task" in row] == [0.0, 0.0, 0.0]
    config = run_config(tiny_cache, out, max_steps=2, save_every=1)
    config["train"]["resume"] = "none"
    again = launch(config, str(tmp_path / "c.yaml"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "was moved to" in again.stdout
    earlier = os.path.join(out, "previous-run-1")
    assert sorted(os.listdir(os.path.join(earlier, "checkpoints"))) == ["step_0000002", "step_0000003"]
    assert step_losses(earlier) == first_losses and os.path.exists(os.path.join(earlier, "final"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000001", "step_0000002"]
    assert sorted(step_losses(out)) == [1, 2]
    config["train"]["resume"] = "auto"
    config["train"]["max_steps"] = 3
    resumed = launch(config, str(tmp_path / "c.yaml"))
    assert "resumed from" in resumed.stdout and "step_0000002" in resumed.stdout


def test_config_changes_lists_what_a_resume_would_change():
    from training.trainer import config_changes

    saved = {"seed": 0, "optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "data": {"slice": "small"},
             "train": {"max_steps": 10}, "tasks": {"austen_mlm": {"weight": 1.0}}}
    requested = {"seed": 0, "optim": {"lr": 0.001, "betas": (0.9, 0.95)}, "data": {"slice": "small", "augment": False},
                 "train": {"max_steps": 20}, "tasks": {"austen_mlm": {"weight": 1.0}, "kjv_mlm": {"weight": 0.5}}}
    # a tuple equals its JSON list, max_steps may change, a field newer than the checkpoint is no change,
    # a task added is one
    assert config_changes(saved, requested) == ["tasks.kjv_mlm.weight: None -> 0.5"]
    assert config_changes(saved, {**requested, "seed": 1})[0] == "seed: 0 -> 1"
    # a checkpoint written without data.end_token_candidate trained without the end token: resuming it with
    # the end token would change its candidates
    with_end = {**requested, "data": {**requested["data"], "end_token_candidate": True}}
    assert "data.end_token_candidate: False -> True" in config_changes(saved, with_end)
    without_end = {**requested, "data": {**requested["data"], "end_token_candidate": False}}
    assert config_changes(saved, without_end) == ["tasks.kjv_mlm.weight: None -> 0.5"]
    # the pixels' transport changes how they travel, not their values (tasks.normalise_pixels)
    as_floats = {**saved, "data": {**saved["data"], "pixel_transport": "float32"}}
    as_bytes = {**requested, "data": {**requested["data"], "pixel_transport": "uint8"}}
    assert config_changes(as_floats, as_bytes) == ["tasks.kjv_mlm.weight: None -> 0.5"]
    # a train setting the code no longer has (a checkpoint's config from before it was renamed) is no change
    renamed = {**saved, "train": {**saved["train"], "compile_per_layer": True}}
    assert config_changes(renamed, requested) == ["tasks.kjv_mlm.weight: None -> 0.5"]


def test_resume_with_other_settings_is_refused_with_a_diff_unless_asked(tiny_cache, tmp_path):
    """A checkpoint resumed with another lr is refused, the message listing each changed setting; with
    train.resume_with_changes the new lr is the one used (the logged rates of steps 3-4 double)."""
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=4, save_every=2)
    crashed = launch(config, str(tmp_path / "c.yaml"), env_extra={"UNIPERCEIVER_TEST_CRASH_AT_STEP": "3"})
    assert crashed.returncode == 17
    before = step_rates(out)[3]
    config["optim"]["lr"] *= 2
    config["train"]["eval_every"] = 1  # reporting settings may change freely
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2
    assert "was trained with other settings" in refused.stderr and "optim.lr: 0.003 -> 0.006" in refused.stderr
    assert "eval_every" not in refused.stderr
    config["train"]["resume_with_changes"] = True
    resumed = launch(config, str(tmp_path / "c.yaml"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_rates(out)[3] == pytest.approx(2 * before, rel=1e-9)


def test_two_processes_give_the_losses_of_one(tiny_cache, tmp_path):
    """`data.task_sampling: shared`: two processes on one task per step train exactly like one process.
    `per_process` (the default, the reference's): process 0 runs the tasks one process would, process 1
    draws its own, and a two-process run trains to the end."""
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    # AdamW moves a weight by about lr whatever the size of its gradient once that is well above eps, so a
    # gradient that is zero up to rounding (its terms cancel) moves by +-lr depending on the summation order:
    # one and two processes sum in different orders. eps 1e-6 keeps such steps proportional to the gradient.
    config = run_config(tiny_cache, one, max_steps=4, save_every=0)
    config["optim"]["eps"] = 1e-6
    assert launch(config, str(tmp_path / "one.yaml")).returncode == 0
    config = run_config(tiny_cache, two, max_steps=4, save_every=0)
    config["optim"]["eps"] = 1e-6
    config["data"]["task_sampling"] = "shared"
    result = launch(config, str(tmp_path / "two.yaml"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), (step, a[step], b[step])
    assert json.load(open(os.path.join(two, "report.json")))["processes"] == 2
    mixed = str(tmp_path / "mixed")
    config = run_config(tiny_cache, mixed, max_steps=4, save_every=0)
    result = launch(config, str(tmp_path / "mixed.yaml"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_tasks(mixed) == step_tasks(one)  # process 0's draws (the ones logged)
    assert all(math.isfinite(loss) for loss in step_losses(mixed).values())


def test_sharded_processes_train_like_data_parallel_ones_and_resume(tiny_cache, tmp_path):
    """`train.fsdp`: two CPU processes that each keep half of every weight, gradient and AdamW moment log the
    losses of two data-parallel processes and save the same final weights. Killed after step 3, the sharded
    run resumes from its step-2 checkpoint (the full weights and optimizer state, gathered into the trainer's
    files and loaded with `weights_only`) and ends where the uninterrupted sharded run does."""
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception

    def run(name: str, env_extra: dict | None = None, **train) -> subprocess.CompletedProcess:
        config = run_config(tiny_cache, str(tmp_path / name), max_steps=4, **train)
        config["optim"]["eps"] = 1e-6  # see test_two_processes_give_the_losses_of_one
        config["data"]["task_sampling"] = "shared"
        return launch(config, str(tmp_path / f"{name}.yaml"), processes=2, env_extra=env_extra)

    for name, train in (("ddp", {"save_every": 0}), ("fsdp", {"save_every": 0, "fsdp": True})):
        result = run(name, **train)
        assert result.returncode == 0, result.stderr[-3000:]
    killed = run("resumed", {"UNIPERCEIVER_TEST_CRASH_AT_STEP": "3"}, save_every=2, fsdp=True)
    assert killed.returncode != 0
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["step_0000002"]
    moments = torch.load(tmp_path / "resumed" / "checkpoints" / "step_0000002" / "optimizer.bin", weights_only=True)
    assert "uniperceiver.encoder.layers.0.mlp.fc1.weight" in moments["state"]  # by name: the sharded run's file
    resumed = run("resumed", save_every=2, fsdp=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    reports = {name: json.load(open(tmp_path / name / "report.json")) for name in ("ddp", "fsdp")}
    assert reports["ddp"]["parameters_held"] == reports["ddp"]["parameters"] == reports["fsdp"]["parameters"]
    assert reports["ddp"]["training_peak_memory_gib"] > 0 and reports["fsdp"]["training_peak_memory_gib"] > 0
    assert reports["fsdp"]["parameters"] / 2 <= reports["fsdp"]["parameters_held"] <= reports["fsdp"]["parameters"] / 2 + 1000
    losses = {name: step_losses(str(tmp_path / name)) for name in ("ddp", "fsdp", "resumed")}
    assert sorted(losses["ddp"]) == sorted(losses["fsdp"]) == sorted(losses["resumed"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert losses["fsdp"][step] == pytest.approx(losses["ddp"][step], rel=1e-4), step
        assert losses["resumed"][step] == pytest.approx(losses["fsdp"][step], rel=1e-6, abs=1e-7), step
    finals = {name: dict(UniPerceiverMoEForGenericPerception.from_pretrained(
        str(tmp_path / name / "final")).named_parameters()) for name in ("ddp", "fsdp", "resumed")}
    for name, weight in finals["fsdp"].items():  # rounding apart (the sharded model merges its experts once per
        # encoder pass, not once per step); an AdamW step of another sign would differ by 2 lr = 6e-3
        assert torch.allclose(weight, finals["ddp"][name], rtol=1e-4, atol=1e-4), name
        assert torch.allclose(weight, finals["resumed"][name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("sampling", ["shared", "per_process"])
def test_candidates_split_across_processes_train_like_whole_ones(sampling, tiny_cache, tmp_path):
    """`data.partition_candidates`: each of two processes encodes its half of the step's class names or
    words (under per-process task draws, of every set either process scores, also when its own task is
    retrieval) and the features are gathered with their gradient: process 0 logs the losses of two
    processes that each encode all of their own candidates."""
    from modeling_uniperceiver_moe.modeling_uniperceiver_moe import CandidateShard

    slices = [CandidateShard(rank, 3, None).take(torch.arange(7), 7).tolist() for rank in range(3)]
    assert slices == [[0, 1, 2], [3, 4, 5], [6, 0, 0]]
    losses, steps = {}, 6
    for partition in (False, True):
        out = str(tmp_path / f"partition{partition}")
        config = run_config(tiny_cache, out, max_steps=steps, save_every=0)
        config["optim"]["eps"] = 1e-6  # as in test_two_processes_give_the_losses_of_one
        config["data"].update(task_sampling=sampling, partition_candidates=partition)
        result = launch(config, str(tmp_path / f"{partition}.yaml"), processes=2)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[partition] = step_losses(out)
    assert sorted(losses[True]) == list(range(1, steps + 1))
    tasks = step_tasks(str(tmp_path / "partitionTrue"))
    assert set(tasks.values()) & {"austen_mlm", "wordnet_lexname_classification", "fashion_mnist_classification",
                                  "emoji_captioning"}
    if sampling == "per_process":  # in some step one process scored no set (retrieval) and the other one did
        from training.tasks import SHARED_CANDIDATE_FAMILIES

        names = sorted(TEST_TASKS)  # the config's tasks as the run reads them (the YAML file sorts its keys)
        draws = MultiTaskLoader([TaskEntry(get_task(name), 1.0, 8, None) for name in names], None, seed=3,
                                world_size=2, task_sampling="per_process")
        assert [draws.task_for_step(micro, 0) for micro in range(steps)] == [tasks[step] for step in range(1, steps + 1)]
        scores_a_set = [[get_task(draws.task_for_step(micro, rank)).family in SHARED_CANDIDATE_FAMILIES
                         for rank in (0, 1)] for micro in range(steps)]
        assert [True, False] in scores_a_set or [False, True] in scores_a_set
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-4), step


def test_a_task_s_candidate_inputs_are_those_its_batches_carry(tiny_cache, context):
    """`tasks.candidate_inputs` (what a process encodes for another process's task under per-process draws
    with split candidates) gives the `target_*` inputs of the task's own batches."""
    from training.tasks import SHARED_CANDIDATE_FAMILIES, candidate_inputs

    ctx, manifest = context
    for name in ("fashion_mnist_classification", "austen_mlm", "emoji_captioning", "wordnet_lexname_classification",
                 "video_clip_classification", "glue_rte"):
        task = get_task(name)
        assert task.family in SHARED_CANDIDATE_FAMILIES
        batch = build_batch(task, rows_of(tiny_cache, manifest, name), ctx, epoch=0)
        expected = {key: value for key, value in batch.inputs.items() if key.startswith("target_")}
        got = candidate_inputs(task, ctx)
        assert sorted(got) == sorted(expected), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)


PER_PROCESS_STEP = """
import os, sys, types
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
from tests.conftest import make_batch, tiny_config
from training.tasks import task_loss

def task_batch(rank):  # rank 0: retrieval of 3 image-text pairs; rank 1: classification of 3 images over 4 names
    g = torch.Generator().manual_seed(rank)
    inputs = make_batch(batch=3, seed=rank)
    candidates = 3 if rank == 0 else 4
    inputs.update(target_input_ids=torch.randint(0, 49000, (candidates, 3), generator=g),
                  target_attribute_vectors=torch.tensor([[1.0, 0, 0, 1, 0, 1, 1, 0]]).expand(candidates, 8),
                  target_task_ids=torch.zeros(candidates, dtype=torch.long))
    family = "retrieval" if rank == 0 else "image_classification"
    labels = torch.arange(3) if rank == 0 else torch.tensor([[0], [3], [1]])
    return inputs, types.SimpleNamespace(task=types.SimpleNamespace(family=family), labels=labels)

def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

def step(model, rank, across):
    inputs, batch = task_batch(rank)
    output = model(**inputs, task_family=batch.task.family)
    task_loss(batch, output, 0.1, across_processes=across).backward()

torch.manual_seed(0)
config = tiny_config("attribute", moe_router_noise_std=0.0)
if "RANK" not in os.environ:  # one process: each task's gradient alone, averaged
    grads = []
    for rank in (0, 1):
        torch.manual_seed(0)
        model = UniPerceiverMoEForGenericPerception(config)
        step(model, rank, True)
        grads.append(gradients(model))
    names = set(grads[0]) | set(grads[1])
    zero = lambda n: torch.zeros_like((grads[0].get(n) if n in grads[0] else grads[1][n]))
    torch.save({n: (grads[0].get(n, zero(n)) + grads[1].get(n, zero(n))) / 2 for n in names}, sys.argv[1])
else:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = DistributedDataParallel(UniPerceiverMoEForGenericPerception(config), find_unused_parameters=True)
    step(model, rank, False)
    if rank == 0:
        torch.save(gradients(model.module), sys.argv[1])
    dist.destroy_process_group()
"""


def test_processes_on_different_tasks_average_each_task_s_gradient(tmp_path):
    """`per_process` task sampling: in one step process 0 runs retrieval and process 1 classification; the
    loss has no collective (each process's own mean, retrieval within the process), so DDP's averaged
    gradient equals the mean of the two tasks' gradients computed alone."""
    script = tmp_path / "step.py"
    script.write_text(PER_PROCESS_STEP)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    alone = subprocess.run([sys.executable, str(script), str(tmp_path / "alone.pt")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29534", str(script), str(tmp_path / "ddp.pt")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    expected, averaged = torch.load(tmp_path / "alone.pt"), torch.load(tmp_path / "ddp.pt")
    assert expected.keys() == averaged.keys()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["video_clip_classification", "emoji_captioning", "fashion_mnist_classification"])
def test_threaded_image_decoding_builds_identical_batches(name, tiny_cache, context):
    import dataclasses

    ctx, manifest = context
    rows = rows_of(tiny_cache, manifest, name, 12)
    rows[3] = dict(rows[3], **({"frames": [{"bytes": b"bad", "path": None}]} if "video" in name
                               else {"image": {"bytes": b"bad", "path": None}}))
    serial = build_batch(get_task(name), rows, ctx, epoch=0)
    threaded_ctx = dataclasses.replace(ctx, workers=4, _cache={})
    threaded = build_batch(get_task(name), rows, threaded_ctx, epoch=0)
    assert serial.skipped == threaded.skipped and len(serial.skipped) == 1
    assert torch.equal(serial.inputs["pixel_values"], threaded.inputs["pixel_values"])
    assert torch.equal(serial.labels, threaded.labels)


def test_weight_decay_skips_norms_biases_embeddings_gates_and_scales():
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from tests.conftest import tiny_config
    from training.trainer import parameter_groups

    model = UniPerceiverMoEForGenericPerception(tiny_config("attribute"))
    decay, no_decay = parameter_groups(model, 0.2, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "uniperceiver.encoder.layers.0.attention.qkv.weight" in decayed  # the [E, out, in] experts
    assert "uniperceiver.encoder.layers.0.mlp.fc1.weight" in decayed
    for name in decayed:
        assert not any(k in name for k in ("norm", "bias", "embedding", "gate", "scale")), name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("routing", ["attribute", "token"])
def test_router_lr_scale_sets_the_gates_learning_rate(routing):
    """optim.router_lr_scale: the gates' parameters (and only they) step at lr * scale under the schedule;
    at 0 they stay as initialised while every other trained parameter moves."""
    from modeling_uniperceiver_moe import UniPerceiverMoEForGenericPerception
    from tests.conftest import tiny_config
    from training.config import OptimConfig
    from training.trainer import cosine_with_warmup, is_router_parameter, make_optimizer

    torch.manual_seed(0)
    model = UniPerceiverMoEForGenericPerception(tiny_config(routing))
    optimizer = make_optimizer(model, OptimConfig(lr=1e-3, router_lr_scale=0.0), torch.device("cpu"))
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3, 0.0]
    routers = {name for name, _ in model.named_parameters() if is_router_parameter(name)}
    assert routers and {id(p) for p in optimizer.param_groups[2]["params"]} == {
        id(p) for name, p in model.named_parameters() if name in routers}
    scheduler = cosine_with_warmup(optimizer, 2, 10, 0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == set(before) - routers
    scheduler.step()
    assert scheduler.get_last_lr() == [1e-3, 1e-3, 0.0]  # warmup step 2 of 2: the peak of every group
    two = make_optimizer(model, OptimConfig(lr=1e-3, router_lr_scale=2.0), torch.device("cpu"))
    assert [group["lr"] for group in two.param_groups] == [1e-3, 1e-3, 2e-3]
    assert len(make_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu")).param_groups) == 2  # as before
    dense = UniPerceiverMoEForGenericPerception(tiny_config("none"))  # no gates: no third group
    assert len(make_optimizer(dense, OptimConfig(router_lr_scale=0.0), torch.device("cpu")).param_groups) == 2


def test_a_task_can_stream_any_parquet_with_a_column_mapping(tmp_path, tiny_cache):
    from datasets import Dataset

    from training.trainer import task_stream_spec
    from training.config import TaskConfig

    path = str(tmp_path / "mine.parquet")
    Dataset.from_dict({"id": ["a", "b", "c"], "sentence": ["one two three", "four five", "six seven"]}).to_parquet(path)
    config = TaskConfig(source={"files": str(tmp_path / "*.parquet"), "columns": {"sentence": "text", "id": "key"}})
    spec = task_stream_spec("austen_mlm", config, "unused", {}, "train")
    rows = TaskStream("austen_mlm", spec, seed=0, shuffle_block=2).take(3)
    assert sorted(r["key"] for r in rows) == ["a", "b", "c"] and all("text" in r for r in rows)
    bad = TaskConfig(source={"files": path, "columns": {"caption": "text"}})
    with pytest.raises(ValueError, match="columns \\['caption'\\] not found"):
        TaskStream("austen_mlm", task_stream_spec("austen_mlm", bad, "x", {}, "train"), 0, 2).take(1)


def test_config_reads_yaml_11_values_as_meant():
    """`mixed_precision: no` (YAML 1.1 reads false) and `lr: 3e-4` (a string without a dot) are taken as the
    user meant them, in files and in --set overrides; a real non-number still names the field."""
    from training.config import apply_overrides

    raw = yaml.safe_load("optim: {lr: 3e-4, weight_decay: 1e-2}\ntrain: {mixed_precision: no}\ntasks: {austen_mlm: {}}")
    config = parse_config(raw)
    assert (config.optim.lr, config.optim.weight_decay, config.train.mixed_precision) == (3e-4, 1e-2, "no")
    config = parse_config(apply_overrides({"tasks": {"austen_mlm": {}}}, ["train.mixed_precision=no", "optim.lr=5e-4"]))
    assert (config.optim.lr, config.train.mixed_precision) == (5e-4, "no")
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        parse_config(apply_overrides({"tasks": {"austen_mlm": {}}}, ["optim.lr=fast"]))
    with pytest.raises(ConfigError, match="data.augment must be true/false"):
        parse_config(apply_overrides({"tasks": {"austen_mlm": {}}}, ["data.augment=sometimes"]))


def test_augmentation_is_drawn_per_sample_and_only_in_training():
    """A clip gets one crop and mirror for all its frames; the draw depends on (seed, task, epoch, sample) only,
    so a resumed run or another process layout sees the same pixels; evaluation batches are never augmented."""
    from PIL import Image

    from modeling_uniperceiver_moe import UniPerceiverMoEProcessor
    from training.tasks import augment_frames, sample_rng

    from conftest import tiny_config

    config = tiny_config("attribute", image_size=16)
    processor = UniPerceiverMoEProcessor.build(image_size=16)
    task = get_task("fashion_mnist_classification")
    ctx = TaskContext(processor.tokenizer, processor.image_processor, config,
                      label_names={task.name: [str(i) for i in range(10)]})
    gradient = Image.fromarray((torch.arange(28 * 28).reshape(28, 28) % 251).to(torch.uint8).numpy(), mode="L")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")
    rows = [{"key": f"k{i}", "image": buffer.getvalue(), "label": i % 10} for i in range(6)]
    plain = build_batch(task, rows, ctx, epoch=0).inputs["pixel_values"]
    first = build_batch(task, rows, ctx, epoch=0, augment=True).inputs["pixel_values"]
    again = build_batch(task, rows[::-1], ctx, epoch=0, augment=True).inputs["pixel_values"]
    later = build_batch(task, rows, ctx, epoch=1, augment=True).inputs["pixel_values"]
    assert torch.equal(first, again.flip(0))  # per sample, not per position in the batch
    assert not torch.equal(first, plain) and not torch.equal(first, later)
    pairs = [dict(row, caption="a grey square") for row in rows]  # other families ignore the flag
    retrieval = get_task("emoji_retrieval")
    assert torch.equal(build_batch(retrieval, pairs, ctx, epoch=0, augment=True).inputs["pixel_values"],
                       build_batch(retrieval, pairs, ctx, epoch=0).inputs["pixel_values"])
    frames = [gradient.convert("RGB"), gradient.convert("RGB").transpose(Image.Transpose.ROTATE_180)]
    out = augment_frames(frames, sample_rng(ctx, task, rows[0], 0))
    assert out[0].size == out[1].size
    assert out[1].tobytes() == augment_frames([frames[1]], sample_rng(ctx, task, rows[0], 0))[0].tobytes()


def test_a_glue_task_trains_from_rows_laid_out_as_the_hub_s_and_needs_a_source(tiny_cache, tmp_path):
    """GLUE tasks bundle no data: rows with the Hub's `nyu-mll/glue` columns (here a local parquet file) train
    and are evaluated in the reference's prompt; without a source the run stops before training, naming the
    setting to give."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rte.parquet"
    premises = ["The cat sat on the mat.", "It rained all day in Paris.", "She bought a red car.", "He plays chess."]
    hypotheses = ["A cat is sitting.", "Paris was dry.", "She owns a car.", "He sleeps all day."]
    pq.write_table(pa.table({"sentence1": premises * 2, "sentence2": hypotheses * 2, "label": [0, 1, 0, 1] * 2,
                             "idx": list(range(8))}), path)
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=2, save_every=0)
    config["tasks"] = {"glue_rte": {"batch_size": 4, "source": {"files": str(path), "format": "parquet"}}}
    done = launch(config, str(tmp_path / "c.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    (task,) = report["tasks"]
    assert task["task"] == "glue_rte" and task["evaluated"] == 8 and 0.0 <= task["value"] <= 1.0
    config["tasks"] = {"glue_rte": {"batch_size": 4}}
    config["output_dir"] = str(tmp_path / "no_source")
    refused = launch(config, str(tmp_path / "c.yaml"))
    assert refused.returncode == 2 and "tasks.glue_rte.source" in refused.stderr, refused.stderr[-3000:]
    assert not os.path.exists(tmp_path / "no_source" / "checkpoints")


def test_the_final_evaluation_scores_generated_captions_and_reports_perplexity(tiny_cache, tmp_path):
    """`train.eval_caption_beam`: the final evaluation (only) adds BLEU-4 and CIDEr-D of beam-search captions
    for each captioning task; MLM and captioning report the perplexity over their candidate words, exp(loss).
    A task at sampling weight 0 is never trained and still evaluated (a zero-shot reading)."""
    out = str(tmp_path / "run")
    config = run_config(tiny_cache, out, max_steps=2, save_every=0, eval_every=1, eval_caption_beam=2)
    config["tasks"] = {name: {"batch_size": 8} for name in ("austen_mlm", "emoji_captioning",
                                                               "fashion_mnist_classification")}
    config["tasks"]["fashion_mnist_classification"]["weight"] = 0.0  # held out: evaluated, never trained
    done = launch(config, str(tmp_path / "c.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fashion_mnist_classification" not in step_tasks(out).values()
    evaluations = [row for row in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
                   if any(key.startswith("eval/") for key in row)]
    assert [row["step"] for row in evaluations] == [1, 2]
    first, final = evaluations
    assert "eval/emoji_captioning/bleu4" not in first
    assert 0.0 <= final["eval/emoji_captioning/bleu4"] <= 100.0 and final["eval/emoji_captioning/cider"] >= 0.0
    for task in ("austen_mlm", "emoji_captioning"):
        assert final[f"eval/{task}/perplexity"] == pytest.approx(math.exp(final[f"eval/{task}/loss"]), rel=1e-9)
    assert "eval/fashion_mnist_classification/perplexity" not in final
    assert "eval/fashion_mnist_classification/bleu4" not in final

    # `python -m training.evaluate` on the saved model, with the run's rows, candidates and seed, is the
    # trainer's final evaluation
    from training.evaluate import main as evaluate_main

    written = evaluate_main(["--model", os.path.join(out, "final"), "--tasks", ",".join(config["tasks"]),
                             "--data_cache", tiny_cache, "--slice", "tiny", "--vocabulary_size", "256",
                             "--samples", "16", "--seed", "3", "--caption_beam", "2", "--out", str(tmp_path / "eval")])
    assert json.load(open(tmp_path / "eval" / "evaluation.json"))["tasks"].keys() == written["tasks"].keys()
    report = {row["task"]: row for row in json.load(open(os.path.join(out, "report.json")))["tasks"]}
    for task, metrics in written["tasks"].items():
        for key in ("accuracy", "token_accuracy", "word_accuracy", "loss", "perplexity", "evaluated",
                    "distinct_predictions", "bleu4", "cider"):
            if f"eval/{task}/{key}" in final:
                assert metrics[key] == pytest.approx(final[f"eval/{task}/{key}"], rel=1e-6, abs=1e-9), (task, key)
        assert metrics["trivial_baseline"] == pytest.approx(report[task]["trivial_baseline"], abs=1e-9)
        if task == "emoji_captioning":
            assert f"eval/{task}/word_accuracy" in final
            assert metrics["word_trivial_baseline"] == pytest.approx(report[task]["word_trivial_baseline"], abs=1e-9)


def test_a_candidate_vocabulary_larger_than_the_slice_is_named_before_the_model_is_read(tiny_cache, context):
    from training.evaluation import task_context
    from training.tasks import frequent_candidates

    ctx, manifest = context
    available = len(manifest["vocabulary"])
    assert len(frequent_candidates(manifest["vocabulary"], available, ctx.model_config.eos_token_id)) == available
    with pytest.raises(ValueError, match=f"choose 1 to {available}"):
        frequent_candidates(manifest["vocabulary"], available + 1, None)
    with pytest.raises(SystemExit, match=f"--vocabulary_size {available + 1}: .*choose 1 to {available}"):
        task_context("no-such-model-folder", ctx.model_config, ["emoji_captioning"], "tiny", tiny_cache, available + 1)


def test_the_evaluate_command_names_bad_input_before_loading_anything(tmp_path):
    from training.evaluate import main as evaluate_main

    common = ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]
    for argv, message in ((["--tasks", "austen_mlm,imagenet"], "unknown task 'imagenet'"),
                          (["--tasks", "austen_mlm,austen_mlm"], "different tasks"),
                          (["--tasks", "austen_mlm", "--samples", "0"], "--samples must be >= 1"),
                          (["--tasks", "austen_mlm"], "cannot load the model")):
        with pytest.raises(SystemExit, match=message):
            evaluate_main(common + argv)
    assert not os.path.exists(tmp_path / "out")
