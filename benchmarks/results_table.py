"""README's results table, rebuilt from the logs under `docs/logs/`.

    python -m benchmarks.results_table            # print the table
    python -m benchmarks.results_table --write    # replace the table in README.md between its markers

Each row reads one or two logs that the runs wrote (the commands are in docs/results.md, docs/training.md
and docs/benchmarks.md), so the README states only what those logs hold; `tests/test_readme.py` checks that
README.md carries exactly this output.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from modeling_uniperceiver_moe.command_line import parse_script_arguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "docs", "logs")
START, END = "<!-- results table: python -m benchmarks.results_table --write -->", "<!-- end of results table -->"
SHORT = {"fashion_mnist_classification": "Fashion-MNIST", "video_clip_classification": "video",
         "wordnet_lexname_classification": "WordNet", "emoji_captioning": "emoji captioning",
         "openclipart_captioning": "openclipart captioning", "emoji_retrieval": "emoji retrieval",
         "openclipart_retrieval": "openclipart retrieval", "austen_mlm": "Austen MLM", "kjv_mlm": "KJV MLM"}
PLAIN = {"ViTForImageClassification": "plain ViT", "BertForMaskedLM": "plain BERT",
         "BertForSequenceClassification": "plain BERT"}


def load(name: str) -> dict:
    with open(os.path.join(LOGS, name), encoding="utf-8") as handle:
        return json.load(handle)


def main_job_row() -> tuple[str, str]:
    report, baselines = load("learning/main_job_cpu_report.json"), load("learning/main_job_cpu_baselines.json")
    rows = {row["task"]: row for row in baselines["rows"]}
    parts = []
    for task, row in rows.items():
        plain = f"{PLAIN[row['plain_model']]} {row['plain']:.3f}; " if row["plain"] is not None else ""
        parts.append(f"{SHORT[task]} {row['model']:.3f} ({plain}trivial {row['trivial']:.3f})")
    what = (f"main job, CPU (2 cores): tiny attribute-MoE, {report['steps']:,} steps over {len(rows)} tasks, "
            f"{report['median_tokens_per_second']:,.0f} tokens/s")
    return what, "held-out: " + ", ".join(parts)


def single_task_row() -> tuple[str, str]:
    run = load("learning/fashion_mnist_ti56p4_h200_baselines.json")
    row, config = run["rows"][0], run["config"]
    what = (f"single-task Fashion-MNIST, Ti, 1 x H200, {config['train']['max_steps']:,} steps of "
            f"{config['tasks']['fashion_mnist_classification']['batch_size']}")
    return what, (f"test accuracy {row['model']:.3f} on {run['plain']['fashion_mnist_classification']['evaluated']:,} "
                  f"images; plain `{row['plain_model']}` trained the same way {row['plain']:.3f} "
                  f"({row['model_vs_plain']:.3f}x)")


def multitask_row() -> tuple[str, str]:
    ti_runs = {run["run"]: run for run in load("learning/gpu_b_config_ti_h200.json")["runs"]}
    b_runs = {run["run"]: run for run in load("learning/gpu_b_config_b_h200.json")["runs"]}
    # the plain baselines of the same shapes (trained on their own task only, so independent of the task mix)
    plain_runs = {run["run"]: run for run in load("learning/multitask_gpu_current_h200.json")["runs"]}

    def final(run: dict) -> dict:
        return {key.split("/")[0]: curve[max(curve, key=int)] for key, curve in run["held_out"].items()}

    def mean_final(runs: list[dict]) -> dict:
        finals = [final(run) for run in runs]
        return {task: sum(f[task] for f in finals) / len(finals) for task in finals[0]}

    def describe(values: dict) -> str:
        return ", ".join(f"{SHORT[task]} {value:.3f}" for task, value in values.items())

    def plain_vit(run: dict) -> tuple[int, float]:
        curve = run["plain"]["fashion_mnist_classification"]["curve"]
        return int(max(curve, key=int)), curve[max(curve, key=int)]

    ti_seeds = [ti_runs[name] for name in sorted(ti_runs) if name.startswith("ticonfig_s")]
    b_seeds = [b_runs[name] for name in sorted(b_runs) if name.startswith("bconfig_s")]
    (steps, plain_ti), (_, plain_b) = plain_vit(plain_runs["plain+ti_lr2e-4"]), plain_vit(plain_runs["plain+b"])
    last_steps = sorted({max(int(step) for step in run["held_out"]["austen_mlm/token_accuracy"])
                         for run in ti_seeds + b_seeds})
    steps_text = f"{last_steps[0]:,}" + (f"-{last_steps[-1]:,}" if len(last_steps) > 1 else "")
    return (f"multi-task `gpu_b.yaml` (nine tasks), H200, {steps_text} steps",
            f"Ti (lr 2e-4), mean of {len(ti_seeds)} seeds: {describe(mean_final(ti_seeds))}. B, mean of "
            f"{len(b_seeds)} seeds: {describe(mean_final(b_seeds))}; a plain ViT of each shape given "
            f"Fashion-MNIST's {steps} steps of a 2,000-step run: Ti {plain_ti:.3f}, B {plain_b:.3f} "
            f"(docs/results.md has the trivial baselines)")


def prompt_tuning_row() -> tuple[str, str]:
    group = load("learning/prompt_tuning_emoji_group_classification-prompt.json")
    unseen = load("learning/prompt_tuning_openclipart_captioning-prompt-unseen.json")
    caption = load("learning/prompt_tuning_emoji_captioning-prompt.json")
    seen = load("learning/prompt_tuning_fashion_mnist_classification-prompt-eval1000.json")
    return ("prompt tuning on 1% of a task (main-job model, CPU), the step chosen on another 1% of the training rows",
            f"emoji group from the image, a task not pre-trained on ({group['train_samples']} rows): accuracy "
            f"{group['before']['accuracy']:.3f} -> {group['after']['accuracy']:.3f}; openclipart captioning, not "
            f"pre-trained on (the main job without it; {unseen['train_samples']} rows): BLEU-4 "
            f"{unseen['before']['bleu4']:.2f} -> {unseen['after']['bleu4']:.2f}, CIDEr-D {unseen['before']['cider']:.3f} "
            f"-> {unseen['after']['cider']:.3f}; emoji captioning, already pre-trained on "
            f"({caption['train_samples']} rows): BLEU-4 {caption['before']['bleu4']:.2f} -> "
            f"{caption['after']['bleu4']:.2f}, CIDEr-D {caption['before']['cider']:.3f} -> {caption['after']['cider']:.3f}; "
            f"Fashion-MNIST, already pre-trained on ({seen['train_samples']} rows): {seen['before']['accuracy']:.3f} -> "
            f"{seen['after']['accuracy']:.3f} on {seen['eval_samples']:,} held-out images")


def routing_ablation_row() -> tuple[str, str]:
    from benchmarks.ablation_report import compare_with_dense, experts_in_use, load_runs, primary_series, seed_spread
    from benchmarks.sweep_summary import by_variant

    runs = load_runs([os.path.join(LOGS, "learning", f"routing_ablation_part{part}_h200.json")
                      for part in range(1, 7)])
    variants = by_variant(runs)
    dense, moe = variants["none"]["held_out"], variants["attribute"]["held_out"]
    compared, at_least, below, _ = compare_with_dense(variants, "attribute")
    keys = [primary_series(task, set(dense) & set(moe)) for task in compared]
    cost = {(r["phase"], r["model"]): r["time_vs_dense"] for r in load("learning/routing_ablation_cost_ti_h200.json")["rows"]}
    used = experts_in_use(runs, "attribute")
    shown = [key for key in keys if key.split("/")[0] in ("fashion_mnist_classification", "kjv_mlm",
                                                         "wordnet_lexname_classification", "emoji_retrieval")]
    seeds = len(variants["none"]["seeds"])
    return (f"routing ablation: MoE routings vs dense, Ti, `gpu_b.yaml` (nine tasks), 1 x H200, 2,000 steps, "
            f"{seeds} seeds each",
            f"attribute's seed mean >= dense's on {len(at_least)} of {len(compared)} tasks, below dense's worst seed on "
            f"{len(below)}; "
            + ", ".join(f"{SHORT[key.split('/')[0]]} {moe[key]['mean']:.3f} vs {dense[key]['mean']:.3f}" for key in shown)
            + f"; interference off the diagonal (ratio of means) {seed_spread(runs, 'attribute', 'off_diagonal_ratio_of_means')['mean']:.3f}"
            f" vs {seed_spread(runs, 'none', 'off_diagonal_ratio_of_means')['mean']:.3f}; per gate, {min(used)}-{max(used)} "
            f"of 8 experts carry > 5% of some task's gate weight; step time {cost[('train', 'attribute')]:.2f}x dense in training, "
            f"{cost[('infer', 'attribute')]:.2f}x in inference (eager); the other routings' seed means >= dense's on "
            + ", ".join(routing_against_dense(variants, routing)
                        for routing in ("task", "token", "modality", "context")))


def routing_against_dense(variants: dict, routing: str) -> str:
    """'<routing> <n> of <tasks> (above/below dense beyond the seed spread on ...)' for the README row."""
    from benchmarks.ablation_report import compare_with_dense

    compared, at_least, below, above = compare_with_dense(variants, routing)
    beyond = "; ".join(f"{side} dense beyond the spread on {', '.join(SHORT[task] for task in tasks)}"
                       for side, tasks in (("above", above), ("below", below)) if tasks)
    return f"{routing} {len(at_least)} of {len(compared)}" + (f" ({beyond})" if beyond else "")

def graphed_ratios(log_name: str) -> dict[tuple[str, str], float]:
    """(phase, routing) -> time vs dense from the per-variant lines of a CUDA-graph `bench_moe` log."""
    with open(os.path.join(LOGS, log_name), encoding="utf-8") as handle:
        rates = {(m[1], m[2]): float(m[3]) for m in
                 re.finditer(r"^\s+(train|infer) (\S+) \+compile\s+(\d+) tok/s", handle.read(), flags=re.M)}
    return {key: rates[(key[0], "none")] / rate for key, rate in rates.items() if key[1] != "none"}


def speed_row() -> tuple[str, str]:
    eager = {(r["phase"], r["model"]): r["time_vs_dense"] for r in load("bench_b_eager_h200.json")["rows"]}
    graphs = graphed_ratios("bench_b_graphs_h200.log")
    graphs.update({(r["phase"], r["model"]): r["time_vs_dense"]
                   for r in load("bench_b_graphs_token_h200.json")["rows"] if r["model"] != "none"})
    implementations = {(r["size"], r["model"]): r["tokens_per_s"]
                       for r in load("bench_experts_implementations_h200.json")["rows"] if r["phase"] == "train"}
    fast = implementations[("b", "token")] / implementations[("b", "token-naive")]

    def listing(ratios: dict, phase: str) -> str:
        return ", ".join(f"{model} {value:.2f}x" for (p, model), value in ratios.items()
                         if p == phase and model != "none")

    return ("MoE step time vs dense, B, 1 x H200, bf16, same process",
            f"training with CUDA graphs: {listing(graphs, 'train')}; inference: {listing(graphs, 'infer')}; "
            f"eager training: {listing(eager, 'train')}; token routing {fast:.1f}x faster than the plain "
            f"per-expert loop (token and context training under CUDA graphs timed while their bf16 expert cast "
            f"outlived fused AdamW steps, one cast per step short: docs/benchmarks.md)")


def trainer_row() -> tuple[str, str]:
    rows = load("bench_trainer_h200.json")["rows"]
    sizes = dict.fromkeys(r["size"] for r in rows)
    listing = "; ".join(f"{size.capitalize()} " + ", ".join(
        f"{'dense' if r['routing'] == 'none' else r['routing']} {r['trainer_tokens_per_s']:,.0f} ({r['trainer_vs_model']:.2f})"
        for r in rows if r["size"] == size) for size in sizes)
    busy = [r["gpu_busy_share"] for r in rows]
    return ("trainer, `gpu_b.yaml` (bf16), 1 x H200, beside the bare eager model step on the same batches",
            f"tokens/s (trainer / model step): {listing}; the GPU is busy {min(busy):.0%}-{max(busy):.0%} of the "
            f"time, so the eager step is bound by launching kernels (token: one expert cast per step short, as above)")


def recorded_rounds(row: dict) -> list[dict]:
    """A bench_trainer row's rounds (a run with `--rounds` of 2 or more) that recorded no CUDA graph: the
    speed after the warm-up."""
    return [one for one in row["rounds"] if one["cuda_graphs_recorded"] == 0]


def recorded_speeds(row: dict) -> tuple[float, float, list[float]]:
    """Trainer and model tokens/s over a row's rounds that recorded no CUDA graph, and each round's ratio."""
    rounds = recorded_rounds(row)
    tokens = sum(one["tokens"] for one in rounds)
    trainer = tokens / sum(one["trainer_seconds"] for one in rounds)
    model = tokens / sum(one["model_seconds"] for one in rounds)
    return trainer, model, [one["trainer_vs_model"] for one in rounds]


def layers_per_graph(log: dict, row: dict) -> int:
    """The encoder layers a compiled call ran in a bench_trainer row: its own field or, where the row lacks
    it, the run's `train.compile_layers_per_graph` override."""
    if "layers_per_graph" in row:
        return row["layers_per_graph"]
    (value,) = [item.split("=", 1)[1] for item in log["overrides"] if item.startswith("train.compile_layers_per_graph=")]
    return int(value)


def spans_trainer_row() -> tuple[str, str]:
    """Every routing of Ti and B compiled in spans (the GPU default): per size and routing the row of the last
    log in `SPANS_LOGS` that ran it (each log is one process); Ti / B from the log that ran both sizes."""
    speeds, spans = {}, set()
    for name in SPANS_LOGS:
        log = load(name)
        for row in log["rows"]:
            speeds[row["size"], row["routing"]] = recorded_speeds(row)
            spans.add(layers_per_graph(log, row))
    (span,) = spans
    listing = "; ".join(f"{size.capitalize()} " + ", ".join(
        f"{'dense' if routing == 'none' else routing} {trainer:,.0f} ({trainer / model:.2f})"
        for routing in ("none", "attribute", "token") for trainer, model, _ in [speeds[size, routing]])
        for size in ("ti", "b"))
    both = {row["size"]: recorded_speeds(row)[0] for row in load(SPANS_TI_AND_B_LOG)["rows"] if row["routing"] == "none"}
    return (f"trainer compiled in spans of {span} layers (`train.compile_layers_per_graph`, the GPU default), "
            "`gpu_b.yaml`, 1 x H200, over the rounds that recorded no CUDA graph",
            f"tokens/s (trainer / model step), four runs on fresh machines: {listing}; Ti dense "
            f"{both['ti'] / both['b']:.2f}x B dense in one run ({both['ti']:,.0f} against {both['b']:,.0f}; token: one "
            f"expert cast per step short, as above)")


SPANS_TI_AND_B_LOG = "bench_trainer_spans_ti_b_h200.json"
SPANS_LOGS = (SPANS_TI_AND_B_LOG, "bench_trainer_spans_moe_ti_h200.json", "bench_trainer_spans_moe_b_h200.json",
              "bench_trainer_spans_read_ti_h200.json")


def render() -> str:
    rows = [main_job_row(), single_task_row(), multitask_row(), routing_ablation_row(), prompt_tuning_row(), speed_row(), trainer_row(),
            spans_trainer_row()]
    return "\n".join(["| what | measured |", "|---|---|"] + [f"| {what} | {measured} |" for what, measured in rows])


def readme_table(path: str = os.path.join(REPO, "README.md")) -> str:
    """The table README.md carries between its markers (stripped of the blank lines around it)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if START not in text or END not in text:
        raise SystemExit(f"error: {path} lacks the markers {START!r} and {END!r} around the table")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write_readme(path: str = os.path.join(REPO, "README.md")) -> None:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if START not in text or END not in text:
        raise SystemExit(f"error: {path} lacks the markers {START!r} and {END!r} around the table")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{before}{START}\n\n{render()}\n\n{END}{after}")


@dataclass
class ResultsTableArguments:
    write: bool = field(default=False, metadata={"help": "replace the table in README.md"})


def main(argv=None) -> None:
    args = parse_script_arguments(ResultsTableArguments, argv, prog="python -m benchmarks.results_table", description=__doc__)
    if args.write:
        write_readme()
    print(render())


if __name__ == "__main__":
    main()
