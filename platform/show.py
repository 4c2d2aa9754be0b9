"""`openllama config show NAME [key=value ...]`: the settings a command would run with, before it runs.

NAME is a command (`data`, `tokenizer`, `eval`, `generate`, `export-hf`, ...: its typed config, with
required settings marked), a training config (configs/train/NAME.yaml or a YAML path: resolved, model
spelled out) or a model preset (tiny, 3b, 7b, ...). Overrides are checked exactly as the command checks
them, so a misspelled field fails here with its name.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import yaml

from openllama import commands
from openllama.config import ConfigError, describe, to_dict
from openllama.train.config import CONFIG_DIR, load_config
from openllama.train.model import PRESETS

# command -> "module:ConfigClass" of the settings it takes (training: configs/train/*.yaml instead)
COMMAND_CONFIGS = {
    "tokenizer": "openllama.data.tokenizer:TokenizerTrainConfig",
    "data": "openllama.data.tokenize:TokenizeConfig",
    "eval": "openllama.eval.run:EvalConfig",
    "generate": "openllama.eval.decode:GenerateConfig",
    "export-hf": "openllama.train.convert.hf:ExportHfConfig",
    "import-hf": "openllama.train.convert.hf:ImportHfConfig",
    "import-easylm": "openllama.train.convert.easylm:ImportEasylmConfig",
    "export-easylm": "openllama.train.convert.easylm:ExportEasylmConfig",
    "pipeline": "openllama.pipeline:PipelineConfig",
}


def train_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def command_config(name: str) -> type:
    module, cls = COMMAND_CONFIGS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve(name: str, overrides: list[str]) -> dict:
    """The resolved settings `name` stands for: a command's config, a training config or a model preset."""
    if name in COMMAND_CONFIGS:
        return describe(command_config(name), overrides)
    if name in PRESETS and name not in train_presets():
        if overrides:
            raise ConfigError(f"overrides apply to training configs; {name!r} is a model preset")
        return {"model": dataclasses.asdict(PRESETS[name])}
    if name not in train_presets() and not name.endswith((".yaml", ".yml")):
        raise ConfigError(f"unknown preset {name!r}; commands: {sorted(COMMAND_CONFIGS)}, training configs: "
                          f"{train_presets()}, model presets: {sorted(PRESETS)}, or a path to a YAML file")
    config = load_config(name, overrides)
    return {**to_dict(config), "resolved_model": dataclasses.asdict(config.llama())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="openllama config", description="Inspect configs.",
                                     epilog=commands.EXIT_CODES)
    subcommands = parser.add_subparsers(dest="command", required=True)
    show = subcommands.add_parser("show", help="print resolved settings as YAML")
    show.add_argument("name", help="a command (data, tokenizer, eval, generate, export-hf, ...), a training config "
                                   "name or YAML path, or a model preset (tiny, 3b, 7b, 13b)")
    show.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.steps=100")
    subcommands.add_parser("list", help="list commands with configs, training configs and model presets")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.command == "list":
            print("commands:        ", " ".join(COMMAND_CONFIGS))
            print("training configs:", " ".join(train_presets()))
            print("model presets:   ", " ".join(sorted(PRESETS)))
            return 0
        print(yaml.safe_dump(resolve(args.name, args.overrides), sort_keys=False), end="")
        return 0

    return commands.run("openllama config show", work)
