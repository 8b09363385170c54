"""The one command-line convention (`modeling_uniperceiver_moe.command_line`) and the scripts that follow it."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Optional

import pytest

from modeling_uniperceiver_moe.command_line import parse_script_arguments

# every command of the repository; each parses its options with parse_script_arguments
SCRIPTS = ("training.pretrain", "training.baselines", "training.build_data", "prompt_tuning.run_prompt_tuning",
           "hub_cards.push", "hub_cards.convert_reference", "modeling_uniperceiver_moe.quickstart",
           "benchmarks.bench_moe", "benchmarks.bench_optimizer", "benchmarks.candidate_spread",
           "benchmarks.find_syncs", "benchmarks.init_signal", "benchmarks.profile_step", "benchmarks.results_table",
           "benchmarks.sweep_summary", "benchmarks.probe_grouped_mm", "benchmarks.route_key_latency",
           "benchmarks.bench_trainer", "training.interference", "training.evaluate", "benchmarks.ablation_report")


@dataclass
class ExampleArguments:
    folder: str = field(metadata={"positional": True, "help": "a folder"})
    repo_id: str = field(metadata={"help": "a name"})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "a rate"})
    kind: str = field(default="model", metadata={"choices": ["model", "adapter"], "help": "a choice"})
    dry_run: bool = field(default=False, metadata={"help": "a switch"})
    set: list[str] = field(default_factory=list, metadata={"help": "repeatable"})
    sizes: list[str] = field(default_factory=lambda: ["ti", "b"], metadata={"help": "a list with a default"})


def test_flags_in_either_spelling_repeated_lists_and_positionals():
    parsed = parse_script_arguments(ExampleArguments, [
        "ckpt", "--repo-id", "u/x", "--learning_rate", "0.5", "--dry-run", "--set", "a=1", "--set", "b=2", "c=3"])
    assert parsed == ExampleArguments(folder="ckpt", repo_id="u/x", learning_rate=0.5, kind="model", dry_run=True,
                                      set=["a=1", "b=2", "c=3"])
    # a list with a default is replaced, not extended
    assert parse_script_arguments(ExampleArguments, ["ckpt", "--repo-id", "u/x", "--sizes", "l"]).sizes == ["l"]


@pytest.mark.parametrize("module, options", [("benchmarks.bench_trainer", "BenchTrainerArguments"),
                                             ("training.config", "RunArguments"),
                                             ("benchmarks.candidate_spread", "CandidateSpreadArguments")])
def test_every_repeated_set_of_a_script_is_kept(module, options):
    options = getattr(importlib.import_module(module), options)
    parsed = parse_script_arguments(options, ["--set", "train.compile=true", "--set", "data.text_padding=buckets"])
    assert parsed.set == ["train.compile=true", "data.text_padding=buckets"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_an_options_file_gives_what_the_same_flags_give(tmp_path, suffix):
    path = tmp_path / f"options{suffix}"
    if suffix == ".yaml":
        path.write_text("folder: ckpt\nrepo_id: u/x\nlearning_rate: 0.5\ndry_run: true\nset: [a=1, b=2]\n")
    else:
        path.write_text('{"folder": "ckpt", "repo_id": "u/x", "learning_rate": 0.5, "dry_run": true, "set": ["a=1", "b=2"]}')
    from_file = parse_script_arguments(ExampleArguments, [str(path)])
    from_flags = parse_script_arguments(ExampleArguments, ["ckpt", "--repo_id", "u/x", "--learning_rate", "0.5",
                                                           "--dry_run", "true", "--set", "a=1", "b=2"])
    assert from_file == from_flags
    path.write_text("folder: ckpt\nrepo_id: u/x\nset: []\nlearning_rate: null\n" if suffix == ".yaml"
                    else '{"folder": "ckpt", "repo_id": "u/x", "set": [], "learning_rate": null}')
    assert parse_script_arguments(ExampleArguments, [str(path)]) == ExampleArguments(folder="ckpt", repo_id="u/x")


@dataclass
class ReportArguments:
    logs: list[str] = field(metadata={"positional": True, "input_files": True, "help": "logs"})
    figures: Optional[str] = field(default=None, metadata={"help": "a prefix"})


def test_a_lone_json_file_is_the_input_of_a_command_whose_positional_takes_files(tmp_path):
    log = tmp_path / "part.json"
    log.write_text('{"runs": []}')
    assert parse_script_arguments(ReportArguments, [str(log)]) == ReportArguments(logs=[str(log)])


@pytest.mark.parametrize("argv, contents, message", [
    (["ckpt", "--repo_id", "u/x", "--bogus", "1"], None, "unrecognized arguments: --bogus 1"),
    (["ckpt"], None, "--repo_id"),  # a required option
    (["ckpt", "--repo_id", "u/x", "--kind", "other"], None, "invalid choice"),
    (["ckpt", "--repo_id", "u/x", "--learning_rate", "fast"], None, "invalid float value"),
    (None, "folder: ckpt\nrepo_id: u/x\nmodel: {hidden_size: 8}\n", "unknown option(s) model"),
    (None, "folder: ckpt\nrepo_id: u/x\nkind: other\n", "invalid choice"),
    (None, "- a\n- b\n", "must map option names to values"),
    (None, "folder: [unclosed\n", "cannot read the options file"),
])
def test_bad_input_ends_in_usage_and_status_2_naming_the_problem(tmp_path, capsys, argv, contents, message):
    if argv is None:
        path = tmp_path / "options.yaml"
        path.write_text(contents)
        argv = [str(path)]
    with pytest.raises(SystemExit) as exit_info:
        parse_script_arguments(ExampleArguments, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_script_parses_its_options_through_the_one_convention(module, capsys):
    script = importlib.import_module(module)
    assert "argparse.ArgumentParser(" not in inspect.getsource(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module}") and "-h, --help" in out


def test_a_run_config_given_where_options_belong_is_refused_naming_the_flag_it_needs(capsys):
    from training.pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(["training/configs/tiny_cpu.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s) data, model, optim" in err and "the options are config, set" in err
