"""`openllama`: one console script, one subcommand per stage; the only table that names every stage.

Each subcommand lives beside the code it drives and is imported only when called, so `openllama --help`
stays fast and a stage's heavy imports (jax, ray, torch) load only for that stage.
"""

from __future__ import annotations

import importlib
import sys

from openllama.commands import EXIT_CODES

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("openllama.data.tokenizer:main", "train a LLaMA-style SentencePiece tokenizer (tokenizer train)"),
    "data": ("openllama.data.tokenize:main", "dedup, tokenize and pack RedPajama (data dedup, tokenize, convert)"),
    "train": ("openllama.train.launch:main", "pretrain LLaMA under Ray Train's JaxTrainer from a YAML config"),
    "plan": ("openllama.train.plan:main", "compile a config's train step for its TPU slice: HBM, FLOPs, traffic"),
    "eval": ("openllama.eval.run:main", "evaluate a checkpoint with lm-evaluation-harness tasks"),
    "generate": ("openllama.eval.decode:main", "generate text from a checkpoint, streamed"),
    "export-hf": ("openllama.train.convert.hf:export_main", "write a checkpoint as a Hugging Face LlamaForCausalLM"),
    "import-hf": ("openllama.train.convert.hf:import_main", "read any LLaMA-architecture Hugging Face checkpoint"),
    "import-easylm": ("openllama.train.convert.easylm:main", "read an EasyLM checkpoint (OpenLLaMA's release)"),
    "export-easylm": ("openllama.train.convert.easylm:export_main", "write a checkpoint as an EasyLM params:: file"),
    "config": ("openllama.show:main", "show the resolved settings of a command or config (config show NAME)"),
    "pipeline": ("openllama.pipeline:main", "run the whole pipeline as Ray jobs (what `make demo` runs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: openllama COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`openllama COMMAND --help` describes one command; `openllama config show COMMAND` its settings.",
              EXIT_CODES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        print(f"openllama: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
