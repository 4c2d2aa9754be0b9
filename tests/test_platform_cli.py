"""`openllama`'s one verb table, and flags derived from config dataclasses.

Every flag of a command with a config is one of its fields, so `--help`, `openllama config show VERB` and
`--set` agree by construction; these tests hold each command to that, parsing and building only.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
import typing
from typing import Any, Literal

import pytest
import yaml

from openllama import cli
from openllama.commands import BadInput
from openllama.config import (
    FLAG,
    METAVAR,
    PARSE,
    POSITIONAL,
    REQUIRED,
    add_field_arguments,
    default_of,
    field_comments,
    flag_of,
    from_arguments,
    settable_fields,
)

CONFIGURED = [verb for verb, command in cli.COMMANDS.items() if command.config is not None]

# values a generic sample would not pass: the field's own check wants one of a few words
KNOWN_WORDS = {"dtype": "bfloat16", "max_shard_size": "2GB", "preset": "tiny", "compare_table": "preview",
               "weights": "book=1,c4=2", "tasks": "local_arc,local_piqa"}
KNOWN_ITEMS = {"filters": ["c4", "gopher"]}


def config_class(verb: str) -> type:
    return cli.load(cli.COMMANDS[verb].config)


def first_type(hint: Any) -> Any:
    """`int | float | None` as int, `str | None` as str: the type a sample value is made of."""
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    return first_type(options[0]) if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def sample(field: dataclasses.Field, hint: Any) -> tuple[list[str], Any]:
    """Command-line words setting `field` to a value other than its default, and that value."""
    flag, default, hint = flag_of(field), default_of(field), first_type(hint)
    positional = field.metadata.get(POSITIONAL)
    if PARSE in field.metadata:
        text = KNOWN_WORDS[field.name]
        return ([text] if positional else [flag, text]), field.metadata[PARSE](text)
    if hint is bool:
        return ([flag] if not default else ["--no-" + flag.removeprefix("--")]), not default
    if typing.get_origin(hint) in (list, tuple):
        items = KNOWN_ITEMS.get(field.name, ["a-1", "b-2"])
        return (items if positional else [w for item in items for w in (flag, item)]), items
    if typing.get_origin(hint) is Literal:
        value = next(choice for choice in typing.get_args(hint) if choice != default)
    elif field.name in KNOWN_WORDS:
        value = KNOWN_WORDS[field.name]
    elif hint is int:
        value = (default if isinstance(default, int) else 0) + 2
    elif hint is float:
        value = default / 2 if isinstance(default, float) and default not in (0.0, 1.0) else 0.5
    else:
        value = "x-7"
    return ([str(value)] if positional else [flag, str(value)]), value


def spelled(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def outcome(verb: str, argv: list[str]) -> Any:
    """The config `openllama VERB ARGV` would run with, or the one line it is refused with."""
    try:
        return cli.parse_config(verb, argv)
    except BadInput as error:
        return f"refused: {error}"


def test_the_top_level_help_lists_every_verb_and_imports_no_stage():
    probe = ("import sys; from openllama.cli import main; main(['--help']); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'ray', 'torch', 'mlflow') "
             "or m.startswith(('openllama.data', 'openllama.train', 'openllama.eval'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    *usage, imported = done.stdout.splitlines()
    assert imported == "[]"
    listed = "\n".join(usage)
    assert all(f"  {verb}  " in listed or f"  {verb} " in listed for verb in cli.COMMANDS)


def test_a_group_word_lists_its_verbs_from_the_table(capsys):
    assert cli.main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert {"data tokenize", "data dedup", "data convert"} <= {line.split("  ")[1] for line in out.splitlines()
                                                               if line.startswith("  data ")}
    assert cli.main(["data"]) == 2 and "data tokenize" in capsys.readouterr().err


def test_every_verb_with_a_config_is_shown_by_config_list(capsys):
    assert cli.main(["config", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()[0].split(":", 1)[1]
    assert [verb.strip() for verb in listed.split(",")] == CONFIGURED


@pytest.mark.parametrize("verb", CONFIGURED)
def test_help_names_every_settable_field_as_its_flag(verb, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*verb.split(), "--help"])
    help_text = capsys.readouterr().out
    assert done.value.code == 0 and help_text.startswith(f"usage: openllama {verb} ")
    missing = [flag_of(f) for f in settable_fields(config_class(verb)) if flag_of(f) not in help_text]
    assert not missing, missing


@pytest.mark.parametrize("verb", CONFIGURED)
def test_config_show_prints_exactly_the_fields_the_parser_sets(verb, capsys):
    cls = config_class(verb)
    assert cli.main(["config", "show", *verb.split()]) == 0, capsys.readouterr().err
    shown = yaml.safe_load(capsys.readouterr().out)
    parsed = vars(cli.build_parser(verb).parse_args([]))
    by_flag = set(parsed) - {"help", "config", "overrides"}
    only_by_set = {f.name for f in dataclasses.fields(cls)} - {f.name for f in settable_fields(cls)}
    assert set(shown) == by_flag | only_by_set and not by_flag & only_by_set
    assert all(value is None for name, value in parsed.items() if name in by_flag)  # the dataclass keeps defaults


@pytest.mark.parametrize("verb", CONFIGURED)
def test_each_flag_builds_the_config_its_set_override_builds(verb, monkeypatch):
    monkeypatch.setenv("OPENLLAMA_API_KEY", "sample-key")  # serve listens on a sample host only with a key
    cls = config_class(verb)
    hints = typing.get_type_hints(cls)
    fields = settable_fields(cls)
    for field in fields:
        # the field under test and every required one (a build needs them), each set to a sample value
        given = {f.name: sample(f, hints[f.name]) for f in fields if f is field or default_of(f) == REQUIRED}
        by_flag = [w for f in fields if f.name in given and f.metadata.get(POSITIONAL) for w in given[f.name][0]]
        by_flag += [w for f in fields if f.name in given and not f.metadata.get(POSITIONAL) for w in given[f.name][0]]
        by_set = [w for name, (_, value) in given.items() for w in ("--set", f"{name}={spelled(value)}")]
        built_by_flag = outcome(verb, by_flag)
        assert not isinstance(built_by_flag, str), (by_flag, built_by_flag)
        assert built_by_flag == outcome(verb, by_set), (by_flag, by_set)
        assert getattr(built_by_flag, field.name) == given[field.name][1], by_flag


def test_a_bad_value_exits_2_with_one_line_naming_the_field(capsys):
    assert cli.main(["generate", "ckpt", "--prompt", "hi", "--max-new-tokens", "many"]) == 2
    assert capsys.readouterr().err.splitlines() == ["openllama generate: max_new_tokens='many' must be of type int"]


def test_a_bad_command_line_exits_2_with_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["export-hf", "ckpt", "out", "--no-such-flag"])
    (line,) = capsys.readouterr().err.splitlines()
    assert done.value.code == 2 and line.startswith("openllama export-hf: unrecognized arguments: --no-such-flag")


def test_a_bare_flag_takes_its_metadata_value():
    assert cli.parse_config("export-hf", ["ckpt", "out", "--register"]).register == ""
    assert cli.parse_config("export-hf", ["ckpt", "out"]).register is None


# --- the flags of one small config, spelled out --------------------------------------------------------


@dataclasses.dataclass
class Example:
    """A config with one field of each kind a flag is derived from."""

    # files to read,
    # any number
    inputs: list[str] = dataclasses.field(metadata={POSITIONAL: True, METAVAR: "INPUT"})
    seq_len: int = 2048  # tokens per row
    track: bool = True  # log to MLflow
    mode: Literal["fast", "exact"] = "exact"  # how to match
    filters: list[str] = dataclasses.field(default_factory=lambda: ["short"],  # rules applied
                                           metadata={FLAG: "--filter", METAVAR: "NAME"})
    ratio: float | None = None  # 50% or less; None: no limit
    nested: dict[str, int] = dataclasses.field(default_factory=dict)  # reached by --set only


def example_parser() -> Any:
    parser = cli.CommandParser(prog="example")
    add_field_arguments(parser, Example)
    return parser


def test_a_fields_help_is_the_comment_above_it_and_beside_it():
    comments = field_comments(Example)
    assert comments["inputs"] == "files to read, any number"
    assert comments["filters"] == "rules applied"
    assert comments["seq_len"] == "tokens per row"


def test_flags_are_derived_by_kind_and_default_to_none():
    help_text = example_parser().format_help()
    assert "INPUT" in help_text and "--seq-len SEQ_LEN" in help_text and "tokens per row (default: 2048)" in help_text
    assert "--track, --no-track" in help_text and "{fast,exact}" in help_text and "--filter NAME" in help_text
    assert "50% or less" in help_text and "--nested" not in help_text
    assert all(value is None for value in vars(example_parser().parse_args([])).values())


def test_flags_set_fields_and_the_dataclass_keeps_the_rest():
    args = example_parser().parse_args(["a", "b", "--no-track", "--mode", "fast", "--filter", "x", "--filter", "y",
                                        "--ratio", "0.5"])
    built = from_arguments(Example, args)
    assert built == Example(inputs=["a", "b"], track=False, mode="fast", filters=["x", "y"], ratio=0.5)
    assert from_arguments(Example, example_parser().parse_args(["a"])).seq_len == 2048
