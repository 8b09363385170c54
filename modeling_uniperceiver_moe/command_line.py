"""The one command-line convention of every script of this repository.

A script declares its options as a dataclass and parses them with `parse_script_arguments`: transformers'
`HfArgumentParser`, which reads flags in either spelling (`--data_fraction 0.01` or `--data-fraction 0.01`),
plus three things:

* a single `.yaml` / `.yml` / `.json` argument holding the options instead of flags, read through the same
  parser, so a file is checked exactly like a command line (types, choices, required options, unknown
  names);
* positional arguments: a field with `metadata={"positional": True}` is given without its flag, in field order;
  one that also has `"input_files": True` takes `.json` / `.yaml` files as its values, so a lone such file
  given to that script is its input, not an options file;
* bad input ends in argparse's usage message and exit status 2 (an unknown flag, an unknown key of the file),
  never in a traceback.

A list option whose default is empty collects every occurrence: `--set a=1 --set b=2` and `--set a=1 b=2`
both give `["a=1", "b=2"]` (argparse's "extend"; a plain `HfArgumentParser` keeps only the last one). A list
with a non-empty default is replaced by the values given.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import types
from typing import TypeVar

import yaml
from transformers import HfArgumentParser

T = TypeVar("T")
OPTION_FILE_SUFFIXES = (".yaml", ".yml", ".json")


class ScriptArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose fields marked `metadata={"positional": True}` are positional arguments."""

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if not field.metadata.get("positional"):
            if collects_occurrences(field) and "action" not in field.metadata:
                field = copy.copy(field)
                field.metadata = types.MappingProxyType({**field.metadata, "action": "extend"})
            return HfArgumentParser._parse_dataclass_field(parser, field)
        kwargs = {k: v for k, v in field.metadata.items() if k not in ("positional", "input_files")}
        if getattr(field.type, "__origin__", None) is list:  # one or more values
            kwargs.update(type=field.type.__args__[0], nargs="+")
        else:
            kwargs["type"] = field.type
            if field.default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=field.default)
        parser.add_argument(field.name, **kwargs)


def collects_occurrences(field: dataclasses.Field) -> bool:
    """A list option with an empty default: every `--name ...` adds its values."""
    if getattr(field.type, "__origin__", None) is not list and not str(field.type).startswith("list["):
        return False
    return field.default_factory is not dataclasses.MISSING and field.default_factory() == []


def build_parser(options: type, prog: str | None = None, description: str | None = None) -> ScriptArgumentParser:
    return ScriptArgumentParser(options, prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)


def option_file_to_argv(path: str, options: type, parser: argparse.ArgumentParser) -> list[str]:
    """The command line that a `.yaml` / `.json` file of options stands for: positional fields first, in
    field order, then `--name value` for the rest (lists as several values, booleans as true / false)."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(f"cannot read the options file {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"{path} must map option names to values, found {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(options) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        parser.error(f"{path} is read as a file of this command's options: unknown option(s) {', '.join(unknown)}; "
                     f"the options are {', '.join(fields)}")
    positional, flags = [], []
    for name, field in fields.items():
        if name not in values or values[name] is None or values[name] == []:
            continue  # the default
        value = values[name]
        words = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if field.metadata.get("positional"):
            positional += words
        else:
            flags += [f"--{name}", *words]
    return positional + flags


def parse_script_arguments(options: type[T], argv: list[str] | None = None, prog: str | None = None,
                           description: str | None = None) -> T:
    """Parse `argv` (default `sys.argv[1:]`) into an `options` dataclass: flags, or one options file."""
    parser = build_parser(options, prog=prog, description=description)
    argv = sys.argv[1:] if argv is None else [os.fspath(a) for a in argv]
    takes_files = any(f.metadata.get("input_files") for f in dataclasses.fields(options))
    if len(argv) == 1 and argv[0].endswith(OPTION_FILE_SUFFIXES) and not takes_files:
        argv = option_file_to_argv(argv[0], options, parser)
    parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return parsed

