"""`openllama config show NAME [key=value ...]`: the settings a command would run with, before it runs.

NAME is a verb of `openllama.cli.COMMANDS` that takes a config (`data tokenize`, `tokenizer train`, `eval`,
`export-hf`, ...: its typed config, with required settings marked; the same fields its `--help` lists as
flags), a training config (configs/train/NAME.yaml or a YAML path: resolved, model spelled out) or a model
preset (tiny, 3b, 7b, ...). Overrides are checked exactly as the command checks them, so a misspelled
field fails here with its name.
"""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from openllama import commands
from openllama.cli import COMMANDS, load
from openllama.config import ConfigError, describe, to_dict
from openllama.train.config import CONFIG_DIR, load_config
from openllama.train.model import PRESETS


def configured_verbs() -> list[str]:
    """The verbs that take a typed config: those `config show VERB` shows."""
    return [verb for verb, command in COMMANDS.items() if command.config is not None]


def train_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve(name: str, overrides: list[str]) -> dict:
    """The resolved settings `name` stands for: a command's config, a training config or a model preset."""
    if name in configured_verbs():
        return describe(load(COMMANDS[name].config), overrides)
    if name in PRESETS and name not in train_presets():
        if overrides:
            raise ConfigError(f"overrides apply to training configs; {name!r} is a model preset")
        return {"model": dataclasses.asdict(PRESETS[name])}
    if name not in train_presets() and not name.endswith((".yaml", ".yml")):
        raise ConfigError(f"unknown preset {name!r}; commands: {configured_verbs()}, training configs: "
                          f"{train_presets()}, model presets: {sorted(PRESETS)}, or a path to a YAML file")
    config = load_config(name, overrides)
    return {**to_dict(config), "resolved_model": dataclasses.asdict(config.llama()),
            "resolved_runtime": dataclasses.asdict(config.runtime())}


def show_main(argv: list[str]) -> int:
    """`openllama config show NAME [KEY=VALUE ...]`, NAME a verb of one or two words or a config."""
    parser = argparse.ArgumentParser(
        prog="openllama config show", usage="openllama config show NAME [KEY=VALUE ...]", epilog=commands.EXIT_CODES,
        description="Print the resolved settings of NAME as YAML: a command (data tokenize, tokenizer train, eval, "
                    "generate, export-hf, ...: the fields its flags set), a training config name or YAML path, "
                    "or a model preset (tiny, 3b, 7b, 13b). KEY=VALUE settings are checked as the command checks "
                    "them, e.g. train.steps=100.")
    parser.add_argument("words", nargs="+", metavar="NAME [KEY=VALUE ...]", help=argparse.SUPPRESS)
    words = parser.parse_args(argv).words
    name_words = 2 if " ".join(words[:2]) in COMMANDS else 1
    name, overrides = " ".join(words[:name_words]), words[name_words:]
    return commands.run("openllama config show", lambda: print(
        yaml.safe_dump(resolve(name, overrides), sort_keys=False), end=""))


def list_main(argv: list[str]) -> int:
    """`openllama config list`: every NAME `config show` takes."""
    argparse.ArgumentParser(prog="openllama config list", description="List every NAME `openllama config show` "
                            "takes: commands with settings, training configs, model presets.").parse_args(argv)
    print("commands:        ", ", ".join(configured_verbs()))
    print("training configs:", ", ".join(train_presets()))
    print("model presets:   ", ", ".join(sorted(PRESETS)))
    return 0
