"""CPU correctness of the benchmark's naive reference and the quick-start job (no timings asserted)."""

import json

import pytest
import torch

from benchmarks.bench_moe import main as bench_main
from benchmarks.bench_moe import naive_experts
from modeling_uniperceiver_moe import UniPerceiverMoEModel
from modeling_uniperceiver_moe.quickstart import main as quickstart_main
from tests.conftest import make_batch, tiny_config


@pytest.mark.parametrize("routing", ["token", "context", "attribute", "task"])
def test_benchmark_naive_reference_computes_the_same_model(routing):
    model = UniPerceiverMoEModel(tiny_config(routing)).eval()
    batch = make_batch()
    ours = model(**batch).last_hidden_state
    with naive_experts():
        naive = model(**batch).last_hidden_state
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)


def test_benchmark_runs_on_a_tiny_size(tmp_path):
    rows = bench_main(["--size", "tiny", "--batch", "2", "--image-size", "32", "--words", "3", "--steps", "1",
                       "--warmup", "0", "--json", str(tmp_path / "b.json")])
    names = {(r["phase"], r["model"]) for r in rows}
    assert ("train", "token-naive") in names and ("infer", "attribute-folded") in names
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "b.json").read_text())["rows"]


def test_quickstart_job(tmp_path):
    report = quickstart_main(["--output-dir", str(tmp_path)])
    assert report["reload_bit_identical"] is True
    assert report["folded_max_abs_diff"] < 1e-5
    assert (tmp_path / "folded" / "model.safetensors").exists() and (tmp_path / "report.json").exists()


def test_benchmark_top1_variants_and_one_task_inputs(monkeypatch):
    from modeling_uniperceiver_moe import moe_implementations

    rows = bench_main(["--size", "tiny", "--batch", "2", "--image-size", "32", "--words", "3", "--steps", "1",
                       "--warmup", "0", "--routings", "none,token-top1,context-top1-unsorted", "--infer-routings", "none,token-top1"])
    assert {(r["phase"], r["model"]) for r in rows} == {("train", "none"), ("infer", "none"), ("train", "token-top1"),
                                                       ("infer", "token-top1"), ("train", "context-top1-unsorted")}
    grouped = []
    original = moe_implementations.grouped_linear
    monkeypatch.setattr(moe_implementations, "grouped_linear", lambda *a, **k: grouped.append(1) or original(*a, **k))
    rows = bench_main(["--size", "tiny", "--batch", "2", "--image-size", "32", "--steps", "1", "--warmup", "0",
                       "--inputs", "classification", "--routings", "attribute", "--infer-routings", "none,attribute"])
    assert {(r["phase"], r["model"]) for r in rows} == {("train", "attribute"), ("infer", "none"), ("infer", "attribute")}
    assert not grouped  # one task: every pass is a single route group, run as plain GEMMs with the merged weights


def test_benchmark_compiled_only_skips_the_eager_runs(monkeypatch):
    from benchmarks import bench_moe

    compiled = []
    monkeypatch.setattr(bench_moe, "compile_encoder", lambda model, *a, **k: compiled.append(model))  # no real compile
    args = ["--size", "tiny", "--batch", "2", "--image-size", "32", "--words", "3", "--steps", "1", "--warmup", "0",
            "--routings", "none,token", "--infer-routings", "none", "--compile", "none"]
    rows = bench_main(args + ["--compiled-only"])
    assert {(r["phase"], r["model"], r["compiled"]) for r in rows} == {
        ("train", "none", True), ("infer", "none", True), ("train", "token", False)}
    assert len(compiled) == 2
    rows = bench_main(args)  # without the flag each compiled variant also runs eager
    assert {(r["phase"], r["model"], r["compiled"]) for r in rows} >= {("train", "none", False), ("train", "none", True)}


def test_sweep_summary_reads_each_run_s_curves_speed_and_plain_baselines(tmp_path, capsys):
    """What sweep_gpu.sh prints and docs/logs keep: held-out headline metrics per step, the median speed,
    each task's pre-clip gradient norms, the plain baselines' curves and the downstream tuning's held-out
    metrics before and after; a run found in two sweep folders is read from the last one."""
    from benchmarks.sweep_summary import main as summary_main

    for folder, accuracy in (("first", 0.5), ("second", 0.625)):
        run = tmp_path / folder / "ti"
        (run / "baselines").mkdir(parents=True)
        rows = [{"step": 1, "task": "kjv_mlm", "grad_norm": 2.5}, {"step": 2, "task": "kjv_mlm", "grad_norm": 1.5},
                {"step": 3, "task": "fashion_mnist_classification", "grad_norm": 0.25},
                {"step": 1, "steps_per_second": 2.0}, {"step": 2, "steps_per_second": 4.0},
                {"step": 3, "steps_per_second": 3.0},
                {"step": 3, "eval/fashion_mnist_classification/accuracy": accuracy,
                 "eval/fashion_mnist_classification/distinct_predictions": 7}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "report.json").write_text(json.dumps({"steps": 3, "max_steps": 3, "tasks": [
            {"task": "fashion_mnist_classification", "trivial_baseline": 0.1171875}]}))
        (run / "baselines" / "baselines.json").write_text(json.dumps(
            {"plain": {"fashion_mnist_classification": {"model": "ViTForImageClassification",
                                                       "curve": [{"step": 3, "accuracy": 0.25}]}}}))
        (run / "tune-emoji_group_classification-prompt").mkdir()
        (run / "tune-emoji_group_classification-prompt" / "results.json").write_text(json.dumps(
            {"task": "emoji_group_classification", "method": "prompt", "train_samples": 22,
             "before": {"accuracy": 0.125, "loss": 2.0, "samples": 172}, "after": {"accuracy": accuracy},
             "selected_step": 100, "train_seconds": 5.0}))
    out = tmp_path / "summary.json"
    summary_main([str(tmp_path / "first"), str(tmp_path / "second"), "--json", str(out), "--command", "c"])
    written = json.loads(out.read_text())
    assert written["command"] == "c" and len(written["runs"]) == 1
    (run,) = written["runs"]
    assert (run["steps"], run["max_steps"]) == (3, 3)
    assert run["held_out"] == {"fashion_mnist_classification/accuracy": {"3": 0.625}}
    assert run["distinct_answers"] == {"fashion_mnist_classification": {"3": 7}}
    assert run["trivial_baseline"] == {"fashion_mnist_classification": 0.1172}
    assert run["median_steps_per_second"] == 3.0
    assert run["gradient_norms"] == {"fashion_mnist_classification": {"steps": 1, "min": 0.25, "median": 0.25},
                                     "kjv_mlm": {"steps": 2, "min": 1.5, "median": 2.5}}
    assert run["plain"]["fashion_mnist_classification"]["curve"] == {"3": 0.25}
    assert run["tuning"] == {"emoji_group_classification/prompt": {
        "before": {"accuracy": 0.125, "loss": 2.0}, "after": {"accuracy": 0.625}, "train_samples": 22,
        "selected_step": 100, "train_seconds": 5.0}}
    printed = capsys.readouterr().out
    assert "3:0.6250  (trivial 0.1172)" in printed
    assert "before: accuracy 0.1250 loss 2.0000; after: accuracy 0.6250" in printed


def test_training_loss_curves_average_each_task_over_windows_keyed_by_their_last_step():
    from benchmarks.sweep_summary import training_loss_curves

    rows = [{"step": 1, "task": "a", "loss": 4.0}, {"step": 10, "task": "a", "loss": 2.0},
            {"step": 11, "task": "a", "loss": 1.0}, {"step": 12, "task": "b", "loss": 3.0},
            {"step": 12, "steps_per_second": 5.0}, {"step": 20, "eval/a/accuracy": 0.5, "loss": 9.0}]
    assert training_loss_curves(rows, window=10) == {"a": {10: 3.0, 20: 1.0}, "b": {20: 3.0}}
    rows[0]["aux_loss"] = rows[1]["aux_loss"] = 0.5  # the routers' part of the loss: the curves leave it out
    assert training_loss_curves(rows, window=10) == {"a": {10: 2.5, 20: 1.0}, "b": {20: 3.0}}


def test_ablation_report_leaves_out_curves_holding_unlogged_router_losses():
    """Token and context routing add load-balancing and z-losses to every step's loss; a run whose log did not
    keep them apart (`aux_loss_logged`) cannot be drawn beside the others, a run whose log did can."""
    from benchmarks.ablation_report import routings_with_unlogged_router_losses

    runs = [{"run": "token_s0", "aux_loss_logged": True}, {"run": "token_s1", "aux_loss_logged": False},
            {"run": "context_s0", "aux_loss_logged": True}, {"run": "none_s0"}, {"run": "attribute_s0"}]
    assert routings_with_unlogged_router_losses(runs) == ["token"]


def test_sweep_summary_groups_seeds_of_a_variant_with_their_spread_and_interference(tmp_path, capsys):
    """Runs `<variant>_s<seed>`: each series' last held-out value, mean and min-max over the seeds, the
    median speed, and the mean off-diagonal interference (and, for MoE, expert overlap) of the runs that
    measured it."""
    from benchmarks.sweep_summary import main as summary_main

    for name, values, speed in (("dense_s0", (0.25, 0.5), 2.0), ("dense_s1", (0.5, 0.75), 4.0),
                                ("attribute_s0", (0.5, 0.625), 3.0), ("plain", (0.1, 0.1), 1.0)):
        run = tmp_path / "sweep" / name
        run.mkdir(parents=True)
        rows = [{"step": 1, "steps_per_second": speed}] + [
            {"step": step, "eval/kjv_mlm/token_accuracy": value} for step, value in zip((5, 10), values)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep" / "attribute_s0" / "interference").mkdir()
    (tmp_path / "sweep" / "attribute_s0" / "interference" / "interference.json").write_text(json.dumps(
        {"tasks": ["a", "b"], "matrix": [[1.0, 0.5], [-0.25, 1.0]], "matrix_ratio_of_means": [[1.0, 0.25], [0.75, 1.0]],
         "expert_overlap": [[1.0, 0.25], [0.25, 1.0]]}))
    out = tmp_path / "summary.json"
    summary_main([str(tmp_path / "sweep"), "--json", str(out)])
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["attribute", "dense"]  # the run without a seed suffix is not a variant
    dense = variants["dense"]
    assert dense["seeds"] == [0, 1] and dense["held_out"]["kjv_mlm/token_accuracy"] == {
        "values": [0.5, 0.75], "mean": 0.625, "min": 0.5, "max": 0.75}
    assert dense["median_steps_per_second"] == 4.0 and dense["interference"] == {}
    assert variants["attribute"]["interference"] == {"off_diagonal_mean_of_ratios": 0.125,
                                                     "off_diagonal_ratio_of_means": 0.5,
                                                     "off_diagonal_expert_overlap": 0.25}
    printed = capsys.readouterr().out
    assert "| kjv_mlm/token_accuracy | 0.625 (0.625-0.625, 1) | 0.625 (0.500-0.750, 2) |" in printed
    assert "| interference off the diagonal (mean of ratios) | 0.125 | - |" in printed
    assert "| tasks' expert overlap off the diagonal (MoE) | 0.250 | - |" in printed


def test_sweep_summary_keeps_the_other_metrics_beside_the_headline(tmp_path, capsys):
    """Retrieval's t2i recall, perplexity and generated-caption scores are their own series: they reach the
    variant table, and a run's `held_out` (one headline curve per task, what the docs' tables read) stays as
    it was."""
    from benchmarks.sweep_summary import main as summary_main

    run = tmp_path / "sweep" / "dense_s0"
    run.mkdir(parents=True)
    rows = [{"step": 5, "eval/kjv_mlm/token_accuracy": 0.25, "eval/kjv_mlm/perplexity": 40.0,
             "eval/emoji_retrieval/i2t_R@1": 0.125, "eval/emoji_retrieval/t2i_R@1": 0.0625},
            {"step": 10, "eval/kjv_mlm/token_accuracy": 0.5, "eval/kjv_mlm/perplexity": 20.0,
             "eval/emoji_captioning/token_accuracy": 0.375, "eval/emoji_captioning/bleu4": 1.5,
             "eval/emoji_captioning/cider": 0.25, "eval/emoji_captioning/loss": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "summary.json"
    summary_main([str(tmp_path / "sweep"), "--json", str(out)])
    written = json.loads(out.read_text())
    (summary,) = written["runs"]
    assert sorted(summary["held_out"]) == ["emoji_captioning/token_accuracy", "emoji_retrieval/i2t_R@1",
                                           "kjv_mlm/token_accuracy"]
    assert summary["other_metrics"] == {"kjv_mlm/perplexity": {"5": 40.0, "10": 20.0},
                                        "emoji_retrieval/t2i_R@1": {"5": 0.0625},
                                        "emoji_captioning/bleu4": {"10": 1.5}, "emoji_captioning/cider": {"10": 0.25}}
    dense = written["variants"]["dense"]["held_out"]
    assert dense["kjv_mlm/perplexity"]["mean"] == 20.0 and dense["emoji_captioning/bleu4"]["mean"] == 1.5
    assert "| emoji_retrieval/t2i_R@1 | 0.062 (0.062-0.062, 1) |" in capsys.readouterr().out


def test_sweep_summary_reads_captioning_words_and_their_baseline(tmp_path):
    """Captioning's `word_accuracy` is one of the other series, and the report's `word_trivial_baseline`
    (the most frequent word, beside always answering the end) is kept per task."""
    from benchmarks.sweep_summary import main as summary_main

    run = tmp_path / "sweep" / "end_s0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval/emoji_captioning/token_accuracy": 0.625,
                                                   "eval/emoji_captioning/word_accuracy": 0.375}) + "\n")
    (run / "report.json").write_text(json.dumps({"tasks": [
        {"task": "emoji_captioning", "trivial_baseline": 0.5, "word_trivial_baseline": 0.125},
        {"task": "fashion_mnist_classification", "trivial_baseline": 0.1}]}))
    out = tmp_path / "summary.json"
    summary_main([str(tmp_path / "sweep"), "--json", str(out)])
    (summary,) = json.loads(out.read_text())["runs"]
    assert summary["other_metrics"] == {"emoji_captioning/word_accuracy": {"4": 0.375}}
    assert summary["trivial_baseline"] == {"emoji_captioning": 0.5, "fashion_mnist_classification": 0.1}
    assert summary["word_trivial_baseline"] == {"emoji_captioning": 0.125}


def test_optimizer_benchmark_times_fused_against_foreach_on_the_main_job_model(capsys):
    from benchmarks.bench_optimizer import main as bench_optimizer

    result = bench_optimizer(["--steps", "1", "--repeats", "1"])
    assert set(result["ms_per_step"]) == {"foreach", "fused"} and result["ratio"] > 0
    assert "fused is" in capsys.readouterr().out


def test_the_gpu_busy_time_is_the_union_of_device_activities():
    """Overlapping kernels count once, and annotations (which span kernels) and host events not at all."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.bench_trainer import busy_seconds

    def event(start, end, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               is_user_annotation=annotation)

    events = [event(0, 10), event(5, 15), event(12, 14), event(20, 30), event(0, 100, annotation=True),
              event(40, 90, device=DeviceType.CPU), event(25, 26)]
    assert busy_seconds(events) == pytest.approx(25e-6)
    assert busy_seconds([]) == 0.0


def test_batch_build_benchmark_times_every_task_drawn(tiny_cache, tmp_path):
    """`benchmarks.bench_batch_build` on a tiny config: every batch built is counted under its task, and the
    per-task figures and the mean are written, with `--compare-token-ids` also those of tokenising every
    text; with `--processes`, each number of worker processes hands over batches; with `--receive`, both
    transports hand over a round's batches. No timing is asserted."""
    import yaml

    from benchmarks.bench_batch_build import main as bench_batch_build_main
    from tests.test_training import run_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_cache, str(tmp_path / "unused"))))
    result = bench_batch_build_main(["--config", str(path), "--steps", "6", "--compare-token-ids",
                                     "--json", str(tmp_path / "build.json")])
    assert sum(row["batches"] for row in result["tasks"].values()) == 6 and result["mean_ms_per_batch"] > 0
    assert all(row["median_ms"] > 0 and row["mean_ms"] > 0 for row in result["tasks"].values())
    assert result["tokenised"]["tasks"].keys() == result["tasks"].keys()  # the same batches, tokenised
    assert json.loads((tmp_path / "build.json").read_text()) == result
    paces = bench_batch_build_main(["--config", str(path), "--steps", "4", "--processes", "1,2"])
    assert set(paces["batches_per_second"]) == {"1", "2"} and paces["ratio_to_first"]["1"] == 1.0
    assert all(pace > 0 for pace in paces["batches_per_second"].values())
    received = bench_batch_build_main(["--config", str(path), "--receive", "--processes", "1", "--rounds", "1"])
    assert {name: row["batches"] for name, row in received["receive"].items()} == {"tensors": 2, "packed": 2}
    with pytest.raises(SystemExit, match="--rounds"):
        bench_batch_build_main(["--config", str(path), "--receive", "--rounds", "0"])


def test_trainer_benchmark_times_the_trainer_and_the_bare_model_on_the_same_batches(tiny_cache, tmp_path):
    """CPU run of `benchmarks.bench_trainer` on the tiny slice: in each round, the bare model step and the
    trainer's loop ran the very batches the trainer took from its workers (the benchmark checks their tasks
    step by step), and the host time is split over the trainer's regions (shares of the profiled wall time, at
    most 1 with the rest). No timing is asserted."""
    import yaml

    from benchmarks.bench_trainer import main as bench_trainer_main
    from tests.test_training import run_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_cache, str(tmp_path / "unused"))))
    rows = bench_trainer_main(["--config", str(path), "--sizes", "config", "--routings", "attribute,none",
                               "--warmup", "1", "--steps", "3", "--rounds", "2", "--profile-steps", "2", "--profile-ops", "5",
                               "--profile-sites", "2",
                               "--pixel-transports", "uint8", "--pin-memory", "loop", "--batch-transports", "tensors",
                               "--json", str(tmp_path / "bench.json")])
    assert [row["routing"] for row in rows] == ["attribute", "none"]
    for row in rows:
        assert row["pixel_transport"] == "uint8"  # the worker hands over bytes; the step normalises them
        assert row["pin_memory"] == "loop"  # (nothing is pinned without a GPU)
        assert row["batch_transport"] == "tensors"
        assert row["trainer_tokens_per_s"] > 0 and row["model_tokens_per_s"] > 0 and row["tokens"] > 0
        assert row["loop_tokens_per_s"] > 0 and row["loop_vs_model"] > 0
        for phase in ("gc_trainer", "gc_model", "gc_loop"):  # Python's collections during each timed phase
            assert len(row[phase]["collections"]) == 3 and row[phase]["seconds"] >= row[phase]["full_seconds"] >= 0
        # the measured steps in two rounds (steps 1-2 and 2-4 of the trainer's count: the loop phase of a round
        # does not move the trainer's count), each timing the three phases; no CUDA graphs on the CPU
        assert [one["steps"] for one in row["rounds"]] == [[1, 2], [2, 4]]
        assert sum(one["tokens"] for one in row["rounds"]) == row["tokens"]
        for one in row["rounds"]:
            assert one["trainer_tokens_per_s"] > 0 and one["model_tokens_per_s"] > 0 and one["loop_tokens_per_s"] > 0
            assert one["cuda_graphs_recorded"] == one["cuda_graphs_recorded_model"] == 0
        assert row["cuda_graphs_recorded_while_measured"] == row["cuda_graphs_recorded_loop"] == 0
        shares = row["host_time_shares"]
        assert set(shares) == {"batch", "to_device", "forward", "backward", "update", "bookkeeping", "other"}
        assert shares["forward"] > 0 and shares["backward"] > 0 and sum(shares.values()) >= 0.99
        assert row["gpu_busy_share"] is None  # no GPU here
        assert row["compile"] == "eager" and row["graphs_compiled_while_measured"] == 0 and row["warmup_seconds"] > 0
        ops = row["top_host_ops"]  # the busiest operations, most host time first, none of the trainer's regions
        assert len(ops) == 5 and all(op["calls"] > 0 for op in ops)
        assert [op["self_host_s"] for op in ops] == sorted((op["self_host_s"] for op in ops), reverse=True)
        assert not {op["name"] for op in ops} & {"trainer/forward", "trainer/backward", "trainer/batch"}
        for op in ops:  # each operation's busiest call sites, at most 2, with no more calls than the operation
            assert 1 <= len(op["sites"]) <= 2 and sum(site["calls"] for site in op["sites"]) <= op["calls"]
        sites = [site["site"] for op in ops for site in op["sites"]]
        assert any(site.startswith(("modeling_uniperceiver_moe/", "training/")) for site in sites), sites
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows


def test_trainer_benchmark_names_its_prefetch_layout_and_refuses_bad_process_counts(tmp_path):
    """Each row says where its batches were built ("process x3" for three worker processes); a count of
    worker processes that is not a whole number >= 1, a pixel or batch transport that does not exist, or call
    sites asked without the operations they belong to, is refused
    before any trainer is built."""
    from types import SimpleNamespace

    from benchmarks.bench_trainer import main as bench_trainer_main
    from benchmarks.bench_trainer import prefetch_worker_label

    def data(prefetch, worker, processes):
        return SimpleNamespace(data=SimpleNamespace(prefetch=prefetch, prefetch_worker=worker,
                                                    prefetch_processes=processes))

    assert prefetch_worker_label(data(0, "process", 3)) == "none"
    assert prefetch_worker_label(data(2, "thread", 1)) == "thread"
    assert prefetch_worker_label(data(2, "process", 1)) == "process"
    assert prefetch_worker_label(data(2, "process", 3)) == "process x3"
    for bad in ("0", "two", "1,-2"):
        with pytest.raises(SystemExit, match="prefetch-processes"):
            bench_trainer_main(["--config", str(tmp_path / "never_read.yaml"), "--prefetch-processes", bad])
    with pytest.raises(SystemExit, match="pixel-transports takes float32, uint8, got 'uint8,bytes'"):
        bench_trainer_main(["--config", str(tmp_path / "never_read.yaml"), "--pixel-transports", "uint8,bytes"])
    with pytest.raises(SystemExit, match="pin-memory takes thread, loop, got 'loop,worker'"):
        bench_trainer_main(["--config", str(tmp_path / "never_read.yaml"), "--pin-memory", "loop,worker"])
    with pytest.raises(SystemExit, match="batch-transports takes packed, tensors, got 'pickled'"):
        bench_trainer_main(["--config", str(tmp_path / "never_read.yaml"), "--batch-transports", "pickled"])
    for bad in ("-1", "four", "1,-4"):
        with pytest.raises(SystemExit, match="layers-per-graph"):
            bench_trainer_main(["--config", str(tmp_path / "never_read.yaml"), "--layers-per-graph", bad])
    with pytest.raises(SystemExit, match="--profile-sites lists the call sites of --profile-ops"):
        bench_trainer_main(["--config", str(tmp_path / "never_read.yaml"), "--profile-sites", "3"])


def test_the_routing_ablation_parts_cover_every_routing_seed_and_single_task():
    """`benchmarks/routing_ablation.sh` (DRY_RUN=1 prints each part's runs): parts 1-6 are every routing
    over seeds 0-2, parts 7-9 train each gpu_b.yaml task alone once, with every other task at weight 0,
    parts 10-11 dense and attribute over seeds 0-2 with openclipart captioning alone at weight 0 (zero-shot),
    part 12 dense and attribute tuned downstream by every method, part 13 attribute with a route balance loss
    over seeds 0-2; part 1 and `cost` time every routing's step; all runs share the same schedule and learning
    rate; parts joined by commas run together, except part 12 (its tuning would apply to every run); a part
    outside 1-13 is refused."""
    import os
    import subprocess
    import sys

    import yaml

    from modeling_uniperceiver_moe.configuration_uniperceiver_moe import MOE_ROUTINGS

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tasks = list(yaml.safe_load(open(os.path.join(repo, "training/configs/gpu_b.yaml")))["tasks"])

    def part(number: int | str) -> list[tuple[str, list[str]]]:
        done = subprocess.run(["bash", "benchmarks/routing_ablation.sh"], cwd=repo, capture_output=True, text=True,
                              env=dict(os.environ, PART=str(number), DRY_RUN="1", PYTHON=sys.executable))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        tuning[number] = [line.removeprefix("tune: ") for line in lines if line.startswith("tune: ")]
        timed[number] = [line.removeprefix("cost: ") for line in lines if line.startswith("cost: ")]
        return [(line.split("|")[0], line.split("|")[1].split()) for line in lines if "|" in line]

    routed, single, zero_shot, tuned, tuning, balanced, timed = set(), [], set(), set(), {}, set(), {}
    assert part("cost") == []  # the step times alone
    for number in range(1, 14):
        for name, args in part(number):
            assert set(args[::2]) == {"--set"}, name
            settings = set(args[1::2])
            assert {"model.model_size=ti", "optim.lr=2.0e-4", "train.max_steps=2000",
                    "train.eval_caption_beam=2"} <= settings, name
            if number <= 6:
                routing = next(s.split("=")[1] for s in settings if s.startswith("model.moe_routing="))
                seed = next(s.split("=")[1] for s in settings if s.startswith("seed="))
                assert name == f"{routing}_s{seed}"
                routed.add((routing, seed))
            elif number <= 9:
                held_out = {s.split(".")[1] for s in settings if s.startswith("tasks.") and s.endswith(".weight=0")}
                (trained,) = set(tasks) - held_out
                assert name == f"single-{trained}_s0" and len(held_out) == len(tasks) - 1
                single.append(trained)
            elif number <= 11:
                routing = next(s.split("=")[1] for s in settings if s.startswith("model.moe_routing="))
                seed = next(s.split("=")[1] for s in settings if s.startswith("seed="))
                held_out = [s for s in settings if s.startswith("tasks.") and s.endswith(".weight=0")]
                assert name == f"zeroshot-{routing}_s{seed}"
                assert held_out == ["tasks.openclipart_captioning.weight=0"]
                zero_shot.add((routing, seed))
            elif number == 13:
                seed = next(s.split("=")[1] for s in settings if s.startswith("seed="))
                assert name == f"attribute-balance_s{seed}"
                assert {"model.moe_routing=attribute", "model.moe_route_balance_coef=0.01"} <= settings
                balanced.add(seed)
            else:
                routing = next(s.split("=")[1] for s in settings if s.startswith("model.moe_routing="))
                assert name == f"tuned-{routing}_s0" and "seed=0" in settings
                assert not any(s.startswith("tasks.") for s in settings)
                tuned.add(routing)
    assert routed == {(routing, seed) for routing in MOE_ROUTINGS for seed in "012"}
    assert sorted(single) == sorted(tasks)
    assert zero_shot == {(routing, seed) for routing in ("none", "attribute") for seed in "012"}
    assert tuned == {"none", "attribute"}
    assert balanced == set("012")
    assert all(not lines for number, lines in tuning.items() if number != 12)
    timed = {number: sorted(lines[0].split(",")) for number, lines in timed.items() if lines}
    assert timed == {"cost": sorted(MOE_ROUTINGS), 1: sorted(MOE_ROUTINGS)}
    (pairs,) = tuning[12]
    assert sorted(pairs.split(",")) == sorted(f"{task}:{method}" for task in
                                              ("emoji_group_classification", "fashion_mnist_classification")
                                              for method in ("prompt", "linear_probe", "full"))
    joined = subprocess.run(["bash", "benchmarks/routing_ablation.sh"], cwd=repo, capture_output=True, text=True,
                            env=dict(os.environ, PART="5,6", DRY_RUN="1", PYTHON=sys.executable))
    assert [line.split("|")[0] for line in joined.stdout.splitlines()] == [
        f"{routing}_s{seed}" for routing in ("modality", "task") for seed in "012"]
    for bad, message in (("14", "PART must be 1-13"), ("5,14", "PART must be 1-13"),
                         ("12,5", "PART 12 tunes every run of its call, so it runs alone")):
        refused = subprocess.run(["bash", "benchmarks/routing_ablation.sh"], cwd=repo, capture_output=True,
                                 text=True, env=dict(os.environ, PART=bad, DRY_RUN="1", PYTHON=sys.executable))
        assert refused.returncode == 2 and message in refused.stderr, bad


def test_by_variant_takes_the_last_step_of_curves_read_back_from_json():
    """A log read back has its steps as strings: "535" sorts after "1070", yet the last evaluation is 1070."""
    from benchmarks.sweep_summary import by_variant

    runs = [{"run": "none_s0", "held_out": {"a/accuracy": {"535": 0.25, "1070": 0.75}}, "median_steps_per_second": 1.0}]
    assert by_variant(runs)["none"]["held_out"]["a/accuracy"]["values"] == [0.75]


def test_ablation_report_compares_routings_with_dense_on_each_task_s_primary_metric(tmp_path):
    """The targets are read off the seed means and spreads of each task's primary metric (CIDEr for captioning;
    for MLM word accuracy, not perplexity, so a task without its primary metric is not compared); the single-task
    gap is the reference minus the multi-task mean; the figures are drawn from the logged curves."""
    pytest.importorskip("matplotlib")
    from benchmarks.ablation_report import main as report_main

    def run(name, accuracy, cider, perplexity, loss):
        return {"run": name, "held_out": {"fashion_mnist_classification/accuracy": {"2000": accuracy},
                                          "emoji_captioning/token_accuracy": {"2000": 0.5}},
                "other_metrics": {"emoji_captioning/cider": {"2000": cider}, "kjv_mlm/perplexity": {"2000": perplexity}},
                "median_steps_per_second": 5.0, "training_loss": {"kjv_mlm": {"100": loss, "200": loss / 2}},
                "interference": {"tasks": ["a", "b"], "matrix": [[1, 0], [0, 1]], "matrix_ratio_of_means": [[1, 0.5], [0.5, 1]],
                                 "off_diagonal_mean_of_ratios": 0.0, "off_diagonal_ratio_of_means": 0.5}}

    runs = [run("none_s0", 0.5, 0.25, 100.0, 4.0), run("none_s1", 0.75, 0.25, 120.0, 2.0),
            run("attribute_s0", 0.25, 0.5, 90.0, 3.0), run("attribute_s1", 0.375, 0.5, 110.0, 3.0),
            run("single-fashion_mnist_classification_s0", 0.875, 0.0, 1.0, 1.0)]
    # one gate: task a spreads over experts 0 and 1, task b puts 0.9 on 1 and 0.1 on 2, 0.04 (< 5%) on 3
    runs[2]["interference"]["expert_usage"] = {"a": [[0.5, 0.5, 0.0, 0.0]], "b": [[0.0, 0.86, 0.1, 0.04]]}
    log = tmp_path / "part.json"
    log.write_text(json.dumps({"runs": runs}))
    text = report_main([str(log), "--figures", str(tmp_path / "ablation")])
    assert "| experts given > 5% of a gate's weight by some task, per gate | - | 3-3 (mean 3.0) | - |" in text
    assert "| fashion_mnist_classification/accuracy | 0.625 (0.500-0.750) | 0.312 (0.250-0.375) | 0.875 |" in text
    # attribute wins captioning on CIDEr (the word accuracies tie), loses Fashion-MNIST beyond the spread
    assert ("- attribute >= dense (seed means) on 1 of 2 tasks: emoji_captioning; beyond the seed spread, above "
            "dense on emoji_captioning, below on fashion_mnist_classification") in text
    assert "dense: mean +0.250 over 1 tasks (fashion_mnist_classification +0.250)" in text
    assert "attribute: mean +0.562 over 1 tasks" in text
    assert (tmp_path / "ablation_curves.png").stat().st_size > 0
    assert (tmp_path / "ablation_interference.png").stat().st_size > 0
    runs[0].update(steps=1654, max_steps=2000)  # stopped by train.max_minutes: not comparable, refused
    log.write_text(json.dumps({"runs": runs}))
    with pytest.raises(SystemExit, match="run none_s0 stopped at step 1654 of 2000"):
        report_main([str(log)])


def test_sweep_gpu_trains_measures_and_tunes_each_run_once(tiny_cache, tmp_path):
    """`benchmarks/sweep_gpu.sh` given again on a warm machine: a finished run is not trained again, and a
    tuning already made is not made again, so a later call may name further tunings of the same runs (here
    on the CPU, with a `python3` that skips the wheels' install)."""
    import os
    import subprocess
    import sys
    import tarfile

    import yaml

    from tests.test_training import run_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/bash\n[ "$1 $2" != "-m pip" ] || exit 0\nexec {sys.executable} "$@"\n')
    (shim / "python3").chmod(0o755)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_cache, str(tmp_path / "unused"), max_steps=1, save_every=0)))
    sweep = tmp_path / "sweep"

    def call(tunings: str) -> subprocess.CompletedProcess:
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        out.mkdir()
        env = dict(os.environ, OUT=str(out), SWEEP_DIR=str(sweep), CONFIG=str(config), TUNE_RUNS=tunings,
                   TUNE_ARGS=f"--data_cache {tiny_cache} --slice tiny --max_steps 1 --eval_samples 8 "
                             "--vocabulary_size 64", PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
                   OMP_NUM_THREADS="1")
        done = subprocess.run(["bash", "benchmarks/sweep_gpu.sh", "a|"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with tarfile.open(out / "sweep.tar.gz") as packed:
            return done, sorted(name for name in packed.getnames() if name.endswith("results.json"))

    first, packed = call("fashion_mnist_classification:linear_probe")
    assert packed == ["./a/tune-fashion_mnist_classification-linear_probe/results.json"]
    probe = sweep / "a" / "tune-fashion_mnist_classification-linear_probe" / "results.json"
    made = probe.stat().st_mtime_ns
    again, packed = call("fashion_mnist_classification:linear_probe,fashion_mnist_classification:prompt")
    assert "a: finished in an earlier call" in again.stdout
    assert probe.stat().st_mtime_ns == made  # not tuned again
    assert packed == ["./a/tune-fashion_mnist_classification-linear_probe/results.json",
                      "./a/tune-fashion_mnist_classification-prompt/results.json"]


def test_sweep_cpu_runs_each_variant_over_the_seeds_with_its_settings(tiny_cache, tmp_path):
    """`benchmarks/sweep_cpu.sh`, the runner of the CPU ablation scripts: every spec over SEEDS, runs named
    <variant>_s<seed> with that spec's settings (a spec may have none), each model's interference and tunings
    when asked, then one summary that records COMMAND."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.test_training import run_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny_cache, str(tmp_path / "unused"), max_steps=2, save_every=0)))
    out, summary = tmp_path / "sweep", tmp_path / "summary.json"
    env = dict(os.environ, OUT_DIR=str(out), CONFIG=str(config), SEEDS="0", SUMMARY=str(summary), COMMAND="c",
               INTERFERENCE_TASKS="fashion_mnist_classification,austen_mlm", INTERFERENCE_SAMPLES="4",
               INTERFERENCE_ARGS=f"--data_cache {tiny_cache} --slice tiny --vocabulary_size 64",
               TUNE_RUNS="fashion_mnist_classification:linear_probe",
               TUNE_ARGS=f"--data_cache {tiny_cache} --slice tiny --max_steps 1 --eval_samples 8 --vocabulary_size 64",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "benchmarks/sweep_cpu.sh", "attribute|",
                           "dense|--set model.moe_routing=none --set train.max_steps=1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr
    written = json.loads(summary.read_text())
    assert written["command"] == "c"
    runs = {run["run"]: run for run in written["runs"]}
    assert {name: run["steps"] for name, run in runs.items()} == {"attribute_s0": 2, "dense_s0": 1}
    assert json.loads((out / "dense_s0" / "report.json").read_text())["routing"] == "none"
    assert all(run["interference"]["tasks"] == ["fashion_mnist_classification", "austen_mlm"] for run in runs.values())
    assert "expert_usage" in runs["attribute_s0"]["interference"]
    assert all(list(run["tuning"]) == ["fashion_mnist_classification/linear_probe"] for run in runs.values())


@pytest.mark.parametrize("script, log", [("routing_ablation_cpu", "routing_ablation_cpu"),
                                         ("route_balance_cpu", "route_balance_cpu"),
                                         ("router_noise_cpu", "router_noise_main_job_cpu"),
                                         ("router_lr_cpu", "router_lr_cpu"), ("tuning_cpu", "tuning_cpu")])
def test_cpu_ablation_scripts_run_what_their_logs_hold(script, log):
    """Each CPU ablation script (DRY_RUN=1 of benchmarks/sweep_cpu.sh) runs exactly the runs of the log
    docs/results.md reads, each with the settings its name says."""
    import os
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", f"benchmarks/{script}.sh"], cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1"))
    assert done.returncode == 0, done.stderr
    runs = dict(line.split("|") for line in done.stdout.splitlines())
    with open(os.path.join(repo, "docs", "logs", "learning", f"{log}.json"), encoding="utf-8") as handle:
        assert sorted(runs) == sorted(run["run"] for run in json.load(handle)["runs"])
    for name, settings in runs.items():
        variant = name.rsplit("_s", 1)[0]
        expected = {"attribute": "", "dense": "--set model.moe_routing=none",
                    "attribute-no-noise": "--set model.moe_router_noise_std=0",
                    "tuned-attribute": "", "tuned-none": "--set model.moe_routing=none"}.get(variant)
        if variant.startswith("balance"):
            expected = f"--set model.moe_route_balance_coef={variant.removeprefix('balance')}"
        elif variant.startswith("router_lr"):
            expected = f"--set optim.router_lr_scale={variant.removeprefix('router_lr')}"
        elif script == "routing_ablation_cpu":
            expected = f"--set model.moe_routing={variant}"
        assert settings == expected, name


def test_fsdp_report_compares_runs_with_the_first(tmp_path):
    """benchmarks.fsdp_report reads each run's report.json and logged losses (the last record of a step wins)
    and gives each run's largest relative loss difference from the first run at the steps both logged."""
    from benchmarks.fsdp_report import main as fsdp_report

    figures = {"processes": 2, "parameters": 1000, "median_tokens_per_second": 50.0}
    for name, sharded, held, losses in (("ddp", False, 1000, [2.0, 1.0]), ("fsdp", True, 500, [2.0, 1.1])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({**figures, "fsdp": sharded, "parameters_held": held,
                                                        "training_peak_memory_gib": 1.5}))
        rows = [{"step": 1, "task": "t", "loss": 9.0}] + [{"step": s, "task": "t", "loss": v}
                                                          for s, v in enumerate(losses, 1)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + [{"step": 2, "lr": 1}]))
    log = tmp_path / "log.json"
    text = fsdp_report([str(tmp_path / "ddp"), str(tmp_path / "fsdp"), "--json", str(log)])
    assert text.splitlines()[2].endswith("| 1,000 (1.00) | 1.50 | 50 | 0.0e+00 |")
    assert text.splitlines()[3].endswith("| 500 (0.50) | 1.50 | 50 | 1.0e-01 |")  # step 2: 1.1 against 1.0
    assert fsdp_report(["--table", str(log)]) == text
