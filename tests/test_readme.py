"""Every ```python block of README.md runs as pasted, in a fresh process and an empty folder."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks() -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(readme_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_snippet_runs_as_pasted(index, tmp_path):
    code = readme_python_blocks()[index]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2", TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"README snippet {index} failed:\n{code}\n{run.stderr[-3000:]}"


def test_readme_results_table_is_the_one_the_logs_give():
    """README's results table is exactly what `python -m benchmarks.results_table` builds from docs/logs."""
    from benchmarks import results_table

    assert results_table.readme_table() == results_table.render(), (
        "README.md's results table differs from the logs: run python -m benchmarks.results_table --write")


def marked_blocks(doc: str, marker: str) -> list[tuple[str, str]]:
    """Every block of docs/`doc` between a line `<!-- {marker}: HEAD -->` and `<!-- end of {marker} -->`, as
    (HEAD, the lines between without trailing blank lines)."""
    with open(os.path.join(REPO, "docs", doc), encoding="utf-8") as handle:
        found = re.findall(rf"<!-- {re.escape(marker)}: (.*?) -->\n(.*?)\n<!-- end of {re.escape(marker)} -->",
                           handle.read(), flags=re.S)
    return [(head, body.rstrip("\n")) for head, body in found]


@pytest.mark.parametrize("marker, logs", [
    ("routing ablation, GPU", [f"routing_ablation_part{part}_h200.json" for part in
                               ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10_11", "12", "13")]
     + ["--cost", "routing_ablation_cost_ti_h200.json"]),
    ("routing ablation, CPU", ["routing_ablation_cpu.json"]),
    ("gates' learning rate, CPU", ["router_lr_cpu.json"]),
    ("downstream tuning, CPU", ["tuning_cpu.json"]),
])
def test_results_routing_ablation_tables_are_the_ones_the_logs_give(marker, logs):
    """docs/results.md's routing-ablation tables are exactly what `python -m benchmarks.ablation_report` prints."""
    from benchmarks.ablation_report import main as report_main

    learning = os.path.join(REPO, "docs", "logs", "learning")
    argv = [arg if arg.startswith("--") else os.path.join(learning, arg) for arg in logs]
    [(_, text)] = marked_blocks("results.md", marker)
    assert text == report_main(argv), \
        "docs/results.md's routing-ablation table differs from the logs: rerun benchmarks.ablation_report"


def test_benchmarks_step_time_tables_are_the_ones_the_logs_give():
    """Each table between docs/benchmarks.md's `bench_moe table` markers is `bench_moe --table` of its log."""
    from benchmarks.bench_moe import markdown_table

    blocks = marked_blocks("benchmarks.md", "bench_moe table")
    assert len(blocks) == 2
    for log, table in blocks:
        with open(os.path.join(REPO, log), encoding="utf-8") as handle:
            assert table == markdown_table(json.load(handle)["rows"]), \
                f"docs/benchmarks.md's table of {log} differs: python -m benchmarks.bench_moe --table {log}"


def test_training_sharding_table_is_the_one_the_log_gives():
    """docs/training.md's sharded-against-replicated table is `benchmarks.fsdp_report --table` of its log."""
    from benchmarks.fsdp_report import table

    [(log, text)] = marked_blocks("training.md", "fsdp table")
    with open(os.path.join(REPO, log), encoding="utf-8") as handle:
        assert text == table(json.load(handle)), f"python -m benchmarks.fsdp_report --table {log}"
