"""One config system for every stage: typed dataclasses, YAML files, `key=value` overrides.

Everything is validated before work starts, and an error names the field (`train.batch_size`) and what
is allowed. Stages define their own dataclasses; this module only builds and checks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from openllama import commands
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
                        help="any setting of `openllama config show` for this command (repeatable)")


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


def run_command(parser: argparse.ArgumentParser, cls: type[T], argv: list[str],
                work: Callable[[T], int | None]) -> int:
    """A command's whole life: parse `argv` (its flags and `--config`/`--set`), build its typed config,
    and run `work` on it under the exit-code convention of `openllama.commands`."""
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return commands.run(parser.prog, lambda: work(from_arguments(cls, args)))


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
