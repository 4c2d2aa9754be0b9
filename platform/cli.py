"""`openllama`: one console script; `COMMANDS` is the one table of its verbs.

A verb names its entry function and, where it takes one, its config class, as "module:name" strings
imported only when that verb runs, so `openllama --help` stays fast and a stage's heavy imports (jax, ray,
torch) load only for that stage. A verb with a config has no hand-written flags: its parser is built from
the config's fields (`openllama.config.add_field_arguments`), so `--help`, `openllama config show VERB`
and `--set` agree by construction.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from openllama import commands
from openllama.config import add_config_arguments, add_field_arguments, from_arguments


@dataclass(frozen=True)
class Command:
    """One verb of `openllama`: what runs it, the settings it takes, and its line in `openllama --help`."""

    entry: str  # "module:function"; given the built config (or, with no config, the argv), returns an exit code
    summary: str  # its line in `openllama --help`
    config: str | None = None  # "module:Class" whose fields are its flags; None: the entry reads its own argv


COMMANDS: dict[str, Command] = {
    "tokenizer train": Command("openllama.data.tokenizer:train_command",
                               "train a LLaMA-style SentencePiece tokenizer on a RedPajama sample",
                               "openllama.data.tokenizer:TokenizerTrainConfig"),
    "data dedup": Command("openllama.data.clean:dedup_command",
                          "filter, decontaminate and deduplicate (exact, MinHash) a RedPajama corpus",
                          "openllama.data.clean:DedupConfig"),
    "data tokenize": Command("openllama.data.pack:tokenize_command",
                             "validate, tokenize and pack RedPajama jsonl into token shards",
                             "openllama.data.pack:TokenizeConfig"),
    "data convert": Command("openllama.data.pack:convert_command",
                            "rewrite a packed dataset of the older format in the current one",
                            "openllama.data.pack:ConvertConfig"),
    "train": Command("openllama.training:main", "pretrain LLaMA under Ray Train's JaxTrainer from a YAML config"),
    "plan": Command("openllama.train.plan:main",
                    "compile a config's train step for its TPU slice: HBM, FLOPs, traffic"),
    "eval": Command("openllama.eval.run:eval_command", "evaluate a checkpoint with lm-evaluation-harness tasks",
                    "openllama.eval.run:EvalConfig"),
    "eval texts": Command("openllama.eval.task_texts:texts_command",
                          "write the item texts of eval tasks, for `data dedup --decontaminate FILE`",
                          "openllama.eval.task_texts:TaskTextsConfig"),
    "generate": Command("openllama.eval.decode:stream_generation", "generate text from a checkpoint, streamed",
                        "openllama.eval.decode:GenerateConfig"),
    "serve": Command("openllama.eval.serve:serve_command",
                     "serve a checkpoint over an OpenAI-compatible HTTP API on Ray Serve",
                     "openllama.eval.serve:ServeConfig"),
    "export-hf": Command("openllama.train.convert.hf:export_command",
                         "write a checkpoint as a Hugging Face LlamaForCausalLM",
                         "openllama.train.convert.hf:ExportHfConfig"),
    "import-hf": Command("openllama.train.convert.hf:import_command",
                         "read any LLaMA-architecture Hugging Face checkpoint",
                         "openllama.train.convert.hf:ImportHfConfig"),
    "import-easylm": Command("openllama.train.convert.easylm:import_command",
                             "read an EasyLM checkpoint (OpenLLaMA's release)",
                             "openllama.train.convert.easylm:ImportEasylmConfig"),
    "export-easylm": Command("openllama.train.convert.easylm:export_command",
                             "write a checkpoint as an EasyLM params:: file",
                             "openllama.train.convert.easylm:ExportEasylmConfig"),
    "config show": Command("openllama.show:show_main",
                           "print the resolved settings of a command, training config or model preset"),
    "config list": Command("openllama.show:list_main",
                           "list the commands with settings, the training configs and the model presets"),
    "pipeline": Command("openllama.pipeline:pipeline_command",
                        "run the whole pipeline as Ray jobs (what `make demo` runs)",
                        "openllama.pipeline:PipelineConfig"),
}


def load(spec: str) -> Any:
    """The object a "module:name" string names; its module is imported here, when the verb runs."""
    module_name, name = spec.split(":")
    return getattr(importlib.import_module(module_name), name)


def split_verb(argv: list[str]) -> tuple[str | None, list[str]]:
    """The verb `argv` starts with (`data tokenize` before a one-word verb) and the arguments after it."""
    for words in (2, 1):
        verb = " ".join(argv[:words])
        if len(argv) >= words and verb in COMMANDS:
            return verb, argv[words:]
    return None, argv


def usage(group: str | None = None) -> str:
    """The verbs (those of `group`, e.g. `data`, or all) with their one line each."""
    verbs = [v for v in COMMANDS if group is None or v.split()[0] == group]
    width = max(map(len, verbs))
    lines = [f"usage: openllama {group or 'COMMAND'} {'VERB ' if group else ''}[ARGS...]", "", "commands:"]
    lines += [f"  {verb:<{width}}  {COMMANDS[verb].summary}" for verb in verbs]
    lines += ["", "`openllama COMMAND --help` describes one command; `openllama config show COMMAND` its settings.",
              commands.EXIT_CODES]
    return "\n".join(lines)


class CommandParser(argparse.ArgumentParser):
    """argparse, with a refused command line told in one line naming the flag (exit 2), like any bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (`{self.prog} --help` lists the flags)\n")


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of a verb with a config: one flag per field, `--config` and `--set`, the entry's docstring."""
    command = COMMANDS[verb]
    if command.config is None:
        raise ValueError(f"`openllama {verb}` takes no config; its entry {command.entry} reads its own argv")
    parser = CommandParser(prog=f"openllama {verb}", description=inspect.getdoc(load(command.entry)),
                           epilog=commands.EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_arguments(parser, load(command.config))
    add_config_arguments(parser)
    return parser


def parse_config(verb: str, argv: list[str]) -> Any:
    """The checked config `openllama VERB ARGV...` would run with, built without running anything."""
    return from_arguments(load(COMMANDS[verb].config), build_parser(verb).parse_args(argv))


def refuse(argv: list[str]) -> int:
    """`openllama data` alone lists the data verbs; an unknown verb is named, with the ones it may mean."""
    group = argv[0] if argv[0] in {v.split()[0] for v in COMMANDS if " " in v} else None
    if group and argv[1:2] in ([], ["-h"], ["--help"]):
        print(usage(group), file=sys.stdout if argv[1:] else sys.stderr)
        return 0 if argv[1:] else 2
    name = " ".join(argv[:2]) if group else argv[0]
    close = [v for v in COMMANDS if v.startswith(name[:3])]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    print(f"openllama: unknown command {name!r}{hint}\n\n{usage(group)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = split_verb(argv)
    if verb is None:
        return refuse(argv)
    command = COMMANDS[verb]
    entry = load(command.entry)
    if command.config is None:
        return int(entry(rest) or 0)
    parser = build_parser(verb)
    args = parser.parse_args(rest)
    return commands.run(parser.prog, lambda: entry(from_arguments(load(command.config), args)))


if __name__ == "__main__":
    sys.exit(main())
