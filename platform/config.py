"""One config system for every stage: typed dataclasses, YAML files, `key=value` overrides.

Everything is validated before work starts, and an error names the field (`train.batch_size`) and what
is allowed. Stages define their own dataclasses; this module only builds and checks them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from openllama.commands import BadInput

T = TypeVar("T")


class ConfigError(BadInput):
    """A config value that is missing, unknown or of the wrong type; the message names the field."""


def _check_value(value: Any, hint: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, field)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{field}: value {value!r} is not allowed")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{field}={value!r} is not allowed; allowed: {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}={value!r} must be a list")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        checked = [_check_value(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return checked if origin is list else tuple(checked)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}={value!r} must be a mapping")
        _, item = typing.get_args(hint) or (Any, Any)
        return {k: _check_value(v, item, f"{field}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field} must be a mapping of {hint.__name__} fields, got {value!r}")
        return build(hint, value, prefix=field)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be of type {hint.__name__}, not a bool")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{field}={value!r} must be of type {hint.__name__}")
    return value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """A `cls` from a nested mapping, every field type-checked; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    where = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(f"unknown field {where}{unknown[0]}; allowed: {names}")
    kwargs = {k: _check_value(v, hints[k], f"{where}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.name not in kwargs and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"missing required field {where}{missing[0]}") from error
        raise


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` becomes (['a', 'b'], 3); the value is read as YAML, so `x=[1,2]` and `y=null` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `values` with each `key=value` set at its dotted path."""
    result = yaml.safe_load(yaml.safe_dump(values))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping")
        node[path[-1]] = value
    return result


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """A validated `cls` from an optional YAML file plus `key=value` overrides."""
    values = _read_mapping(Path(path)) if path is not None else {}
    return build(cls, apply_overrides(values, overrides or []))


def to_dict(config: Any) -> dict[str, Any]:
    """The plain nested mapping of a config dataclass, as written to YAML and MLflow."""
    return dataclasses.asdict(config)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` becomes `{'a.b': 1}`, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


SECRET_WORDS = {"token", "secret", "password", "passwd", "key", "credentials"}


def looks_secret(name: str) -> bool:
    """`api_key`, `hf_token`, `db.password` look secret; `num_key_value_heads`, `bos_token_id` do not."""
    words = name.rsplit(".", 1)[-1].lower().split("_")
    return words[-1] in SECRET_WORDS or words[0] == "secret"


URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def hide_credentials(value: Any) -> Any:
    """`http://user:password@host` becomes `http://***@host`: credentials in a URL are a secret too."""
    return URL_CREDENTIALS.sub("***@", value) if isinstance(value, str) else value


def redact(flat: dict[str, Any]) -> dict[str, Any]:
    """Values whose names look secret are replaced, so they never reach MLflow or logs in clear."""
    return {k: ("***" if looks_secret(k) and v not in (None, "") else hide_credentials(v)) for k, v in flat.items()}


def redact_tree(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`redact` for a nested mapping (a config written to a file), keeping its shape."""
    return {
        k: redact_tree(v, f"{prefix}{k}.") if isinstance(v, dict) else redact({f"{prefix}{k}": v})[f"{prefix}{k}"]
        for k, v in values.items()
    }


REQUIRED = "<required>"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config YAML` and `--set KEY=VALUE`, beside a command's own flags (which win over the file)."""
    parser.add_argument("--config", metavar="YAML", help="settings file; flags and --set win over it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="any field `openllama config show` lists for this command, the value read as YAML; "
                             "also the fields no flag sets (repeatable)")


def from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    """A validated `cls` from `--config`, then the flags whose names are fields (None = not given), then `--set`.

    Flags default to None so that the dataclass holds the one default of every setting.
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values = _read_mapping(Path(args.config))
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return build(cls, apply_overrides(values, getattr(args, "overrides", None) or []))


# --- flags derived from a config dataclass ------------------------------------------------------------
# Every field of a command's config is its flag: `seq_len` is `--seq-len`, its help is the field's comment
# and its default the dataclass's, so `--help`, `openllama config show` and `--set` agree by construction.
# A field's `dataclasses.field(metadata={...})` may shape its flag with these keys:

POSITIONAL = "positional"  # True: an argument, not a flag (a list takes any number); none given: --config/--set
FLAG = "flag"  # the spelling to keep where it is not the derived `--field-name` (`--filter` for `filters`)
METAVAR = "metavar"  # the name of the value in --help (`NAME`, `DIR`); a positional's name (default: FIELD_NAME)
PARSE = "parse"  # a function from the flag's one word to the field's value (`--tasks a,b`, `--weights c4=1`)
BARE = "bare"  # the value of the flag given with no value after it (`--register` alone means "")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of `cls` (and of its dataclass bases): the comment lines directly
    above the field, then the one on its line. It is the field's --help, written once beside the field."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not cls:
            comments.update(field_comments(klass))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built in a REPL): the flags go without help
        return comments
    by_line: dict[int, tuple[str, bool]] = {}  # line -> (comment text, whether the comment is the whole line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = (token.string.lstrip("#").strip(), token.line.lstrip().startswith("#"))
    class_def = ast.parse(source).body[0]
    for node in class_def.body if isinstance(class_def, ast.ClassDef) else []:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in by_line and by_line[line][1]:
            above.insert(0, by_line[line][0])
            line -= 1
        beside = [by_line[n][0] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in by_line]
        comments[node.target.id] = " ".join(above + beside)
    return comments


def _without_none(hint: Any) -> Any:
    """`str | None` as `str`: None is a default, never something typed on a command line. (A union of
    several types, `int | float | None`, stays whole: its flag's word is read as YAML.)"""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _is_text(hint: Any) -> bool:
    if typing.get_origin(hint) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(hint))
    return hint is str


def _flag_type(hint: Any) -> Callable[[str], Any]:
    """How a flag's word becomes a value: as typed for text, else read as YAML, exactly as `--set` reads it,
    so that `build` checks it and a bad value is one line naming the field."""
    return str if _is_text(hint) else _read_yaml_word


def _read_yaml_word(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text  # not YAML: `build` refuses it by the field's type


def _parsing(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, its refusal kept word for word in argparse's one line (argparse rewords a plain ValueError)."""
    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    read.__name__ = getattr(parse, "__name__", "value")
    return read


def settable_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` a flag sets: all but nested dataclasses and mappings (without a PARSE), which
    `--set a.b=value` and `--config` reach."""
    hints = typing.get_type_hints(cls)

    def flat(hint: Any) -> bool:
        origin = typing.get_origin(hint)
        if origin in (list, tuple):
            return all(flat(a) for a in typing.get_args(hint) if a is not Ellipsis)
        if origin in (typing.Union, types.UnionType):
            return all(flat(a) for a in typing.get_args(hint))
        return not (dataclasses.is_dataclass(hint) or hint is dict or origin is dict)

    return [f for f in dataclasses.fields(cls) if f.init and (PARSE in f.metadata or flat(hints[f.name]))]


def flag_of(field: dataclasses.Field) -> str:
    """What sets `field` on a command line: `--seq-len` for `seq_len`, the spelling its metadata keeps, or,
    for a positional field, the name its value goes by in --help (`INPUT`)."""
    if field.metadata.get(POSITIONAL):
        return field.metadata.get(METAVAR, field.name.upper())
    return field.metadata.get(FLAG, "--" + field.name.replace("_", "-"))


def default_of(field: dataclasses.Field) -> Any:
    """The dataclass's default of `field` (a factory's value), or REQUIRED."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED


class _NoneIfEmpty(argparse.Action):
    """A positional list given no values is not given, so that `--config` or `--set` may supply it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values or None)


def add_field_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per settable field of `cls`, each defaulting to None so that `cls` keeps the one default
    (`from_arguments`): bools as `--x/--no-x`, a Literal as choices, a list as a repeatable flag."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for field in settable_fields(cls):
        hint, meta = _without_none(hints[field.name]), field.metadata
        origin = typing.get_origin(hint)
        is_list = origin in (list, tuple) and PARSE not in meta
        item = _without_none(typing.get_args(hint)[0]) if is_list else hint
        default = default_of(field)
        notes = ["required" if default is REQUIRED else f"default: {_spelled(default)}"]
        if is_list and not meta.get(POSITIONAL):
            notes.append("repeatable")
        help_text = " ".join(filter(None, [comments.get(field.name, ""), f"({'; '.join(notes)})"]))
        options: dict[str, Any] = {"help": help_text.replace("%", "%%"), "default": None}
        if PARSE in meta:
            options["type"] = _parsing(meta[PARSE])
        elif typing.get_origin(item) is typing.Literal:
            choices = typing.get_args(item)
            options.update(choices=choices, type=_flag_type(item))
        elif item is not bool:
            options["type"] = _flag_type(item)
        if meta.get(POSITIONAL):
            if is_list:
                options.update(nargs="*", action=_NoneIfEmpty)
            else:
                options["nargs"] = "?"
            parser.add_argument(field.name, metavar=flag_of(field), **options)
            continue
        if item is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif is_list:
            options["action"] = "append"
        if METAVAR in meta:
            options["metavar"] = meta[METAVAR]
        if BARE in meta:
            options.update(nargs="?", const=meta[BARE])
        parser.add_argument(flag_of(field), dest=field.name, **options)


def _spelled(value: Any) -> str:
    """A default as `--set` and `openllama config show` spell it (YAML: null, true, [short])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def describe(cls: type, overrides: list[str] | None = None) -> dict[str, Any]:
    """`cls`'s settings with `overrides` applied, checked, and required fields not given shown as <required>."""
    values = apply_overrides({}, overrides or [])
    missing = {f.name: REQUIRED for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING}
    stand_ins = {name: _stand_in(typing.get_type_hints(cls)[name]) for name in missing}
    built = to_dict(build(cls, {**values, **stand_ins}))
    return {**built, **missing}


def _stand_in(hint: Any) -> Any:
    """A value of type `hint` that lets `describe` build a config whose required field was not given."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return []
    if origin is dict:
        return {}
    if origin in (typing.Union, types.UnionType):
        return _stand_in(next(a for a in typing.get_args(hint) if a is not type(None)))
    return {int: 0, float: 0.0, bool: False}.get(hint, "")


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded
