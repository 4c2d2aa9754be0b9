"""`openllama config show PRESET`: the fully resolved config a command would run with, before it runs.

PRESET is a training config (configs/train/NAME.yaml, or any YAML path) or a model preset (tiny, 3b,
7b, ...); `key=value` overrides apply to training configs exactly as `openllama train` applies them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from openllama.config import ConfigError, to_dict


def train_presets() -> list[str]:
    from openllama.train.config import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve(name: str, overrides: list[str]) -> dict:
    """The resolved config named `name`: a training config (with its model spelled out) or a model preset."""
    from openllama.train.config import load_config
    from openllama.train.model import PRESETS

    if name in PRESETS and name not in train_presets():
        if overrides:
            raise ConfigError(f"overrides apply to training configs; {name!r} is a model preset")
        return {"model": dataclasses.asdict(PRESETS[name])}
    if name not in train_presets() and not name.endswith((".yaml", ".yml")):
        raise ConfigError(f"unknown preset {name!r}; training configs: {train_presets()}, "
                          f"model presets: {sorted(PRESETS)}, or a path to a YAML file")
    config = load_config(name, overrides)
    return {**to_dict(config), "resolved_model": dataclasses.asdict(config.llama())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama config", description="Inspect configs.")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print a resolved config as YAML")
    show.add_argument("preset", help="training config name or YAML path, or model preset (tiny, 3b, 7b, 13b)")
    show.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.steps=100")
    commands.add_parser("list", help="list training configs and model presets")
    args = parser.parse_args(argv)
    if args.command == "list":
        from openllama.train.model import PRESETS

        print("training configs:", " ".join(train_presets()))
        print("model presets:   ", " ".join(sorted(PRESETS)))
        return 0
    try:
        resolved = resolve(args.preset, args.overrides)
    except ConfigError as error:
        print(f"openllama config show: {error}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0
