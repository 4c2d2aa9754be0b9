"""Both CPU ratios as a new user meets them: each tool through its own command line, a fresh process per run.

  tokenize  `openllama data tokenize` (its in-process Ray included) against Hugging Face `datasets` in a fresh
            Python (`load_dataset("json")`, `map(batched=True, num_proc=cores)`, `to_parquet`), on uneven
            RedPajama-layout files: one subset holds most of the bytes, as book and c4 do in RedPajama.
  eval      `openllama eval CKPT --tasks ...` against `lm_eval --model hf` on the same weights (our checkpoint
            and its `export_hf` copy, float32, ~60M parameters), the local pack's multiple-choice tasks.

Each round runs both, the order reversed every other round; the figure is the median of the rounds' ratios,
with their spread. Our runs are also split by where their time went, from the timestamps of their own log lines
(process start to the first line: imports; to the work's start: Ray and planning, or the model load and
compilation; then the work itself), so that a ratio can be explained, not only printed.

    .venv/bin/python -P bench/end_to_end.py [--which tokenize,eval] [--rounds 3] [--megabytes 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# each subset's share of the corpus's bytes, one file per subset: uneven, as RedPajama's are
SHARES = {"book": 0.55, "c4": 0.2, "common_crawl": 0.1, "github": 0.06, "wikipedia": 0.04, "arxiv": 0.03,
          "stackexchange": 0.02}
SAMPLE_FILE = {"book": "book", "c4": "c4", "common_crawl": "cc_2019-30", "github": "github",
               "wikipedia": "wikipedia", "arxiv": "arxiv", "stackexchange": "stackexchange"}
TASKS = "local_arc,local_hellaswag,local_piqa,local_boolq"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

DATASETS_SCRIPT = """
import sys, time
import datasets, sentencepiece as spm
datasets.disable_progress_bars()
tokenizer, out, cores, *files = sys.argv[1:]
def encode(batch):
    processor = spm.SentencePieceProcessor(model_file=tokenizer)
    return {"input_ids": processor.encode(batch["text"], add_bos=True, add_eos=True, num_threads=1)}
features = datasets.Features({"text": datasets.Value("string"), "meta": datasets.Value("string")})
dataset = datasets.load_dataset("json", data_files=files, split="train", features=features, cache_dir=out + "/cache")
tokenized = dataset.map(encode, batched=True, batch_size=1000, num_proc=int(cores), remove_columns=dataset.column_names)
tokenized.to_parquet(out + "/tokens.parquet")
print(sum(len(ids) for batch in tokenized.iter(batch_size=10_000) for ids in batch["input_ids"]))
"""


def timed(command: list[str], **kwargs) -> tuple[float, float, subprocess.CompletedProcess]:
    """(start epoch, seconds, the finished process); fails with the command's output."""
    started, clock = time.time(), time.perf_counter()
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=REPO, **kwargs)
    seconds = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-4000:]}")
    return started, seconds, done


def line_times(stderr: str) -> list[tuple[float, str]]:
    """(epoch, message) of each line our logging stamped."""
    found = []
    for line in stderr.splitlines():
        if m := LOG_TIME.match(line):
            found.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), line[m.end():]))
    return found


def phases(started: float, seconds: float, stderr: str, work_starts: str) -> dict[str, float]:
    """Where a run of ours spent its time: to its first log line (Python and the imports), to the line
    that starts the work (`work_starts`: planning), then the work to the process's end."""
    lines = line_times(stderr)
    if not lines:
        return {}
    first = lines[0][0]
    work = next((t for t, message in lines if work_starts in message), first)
    return {"imports": first - started, "planning": work - first, "work and exit": started + seconds - work}


def alternated(rounds: int, runs: dict[str, Callable[[int], tuple[float, Any]]]) -> list[dict[str, tuple]]:
    """Each round runs every tool once (`run(round) -> (seconds, what it made)`), the order reversed every other
    round, so that the machine's drift falls on all alike; per round, {name: (seconds, what it made)}."""
    return [{name: runs[name](round_) for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1])}
            for round_ in range(rounds)]


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)"


def print_phases(name: str, runs: list[dict[str, float]]) -> None:
    if runs and all(runs):
        parts = ", ".join(f"{key} {statistics.median(r[key] for r in runs):.1f} s" for key in runs[0])
        print(f"  {name}, median by phase: {parts}")


# --- tokenize ---------------------------------------------------------------------------------------------


def uneven_corpus(root: Path, megabytes: int) -> list[str]:
    """One jsonl file per subset, sized by SHARES, from the sample's records reshuffled. Each record keeps
    `text` and `meta` (as a JSON string): the subsets' other fields differ, and `datasets` reads the files as
    one table, which needs one schema."""
    rng = random.Random(0)
    paths = []
    for subset, share in SHARES.items():
        with open(SAMPLE / f"{SAMPLE_FILE[subset]}_sample.jsonl", encoding="utf-8") as f:
            records = [json.dumps({"text": record["text"], "meta": json.dumps(record.get("meta", {}))}) + "\n"
                       for record in map(json.loads, filter(str.strip, f))]
        path = root / subset / f"{subset}_0000.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        size, target = 0, int(megabytes * 1_000_000 * share)
        with open(path, "w", encoding="utf-8") as out:
            while size < target:
                line = rng.choice(records)
                out.write(line)
                size += len(line.encode())
        paths.append(str(path))
    return paths


def bench_tokenize(scratch: Path, megabytes: int, rounds: int) -> None:
    from openllama.data.tokenizer import train_sentencepiece

    cores = os.cpu_count() or 1
    texts = [json.loads(line)["text"] for path in sorted(SAMPLE.glob("*.jsonl")) for line in open(path)]
    tokenizer = str(train_sentencepiece(texts, scratch / "tokenizer", vocab_size=8000))
    files = uneven_corpus(scratch / "corpus", megabytes)
    sizes = [Path(f).stat().st_size / 1e6 for f in files]
    print(f"tokenize: {sum(sizes):.0f} MB in {len(files)} files ({', '.join(f'{s:.0f}' for s in sizes)} MB), "
          f"vocab 8000, seq_len 2048, {cores} cores")
    def ours(round_: int) -> tuple[float, tuple[int, dict]]:
        out = scratch / f"openllama-{round_}"
        started, seconds, done = timed([str(BIN / "openllama"), "data", "tokenize", *files, "--tokenizer", tokenizer,
                                        "--out", str(out), "--seq-len", "2048", "--no-track"])
        tokens = json.loads((out / "manifest.json").read_text())["stats"]["total"]["tokens"]
        shutil.rmtree(out)
        return seconds, (tokens, phases(started, seconds, done.stderr, "units,"))

    def theirs(round_: int) -> tuple[float, int]:
        out = scratch / f"datasets-{round_}"
        out.mkdir()
        _, seconds, done = timed([sys.executable, "-c", DATASETS_SCRIPT, tokenizer, str(out), str(cores), *files])
        shutil.rmtree(out)
        return seconds, int(done.stdout.split()[-1])

    ratios, ours_phases = [], []
    for number, took in enumerate(alternated(rounds, {"openllama": ours, "datasets": theirs}), start=1):
        (ours_s, (tokens, spent)), (theirs_s, their_tokens) = took["openllama"], took["datasets"]
        assert tokens == their_tokens, (tokens, their_tokens)
        ratios.append(theirs_s / ours_s)
        ours_phases.append(spent)
        print(f"  round {number}: openllama {ours_s:.1f} s, datasets {theirs_s:.1f} s, {tokens:,} tokens each")
    print(f"  openllama / datasets, end to end: {spread(ratios)} (target >= 1.0)")
    print_phases("openllama data tokenize", ours_phases)


# --- eval ---------------------------------------------------------------------------------------------------


PROFILED = {  # (file ending, function): what its cumulative time is called
    ("platform/cli.py", "<module>"): "the whole command",
    ("eval/run.py", "<module>"): "importing the eval command (JAX, our modules)",
    ("lm_eval/evaluator.py", "simple_evaluate"): "lm-eval: tasks, requests, scoring",
    ("eval/backend.py", "__init__"): "loading the checkpoint (OpenLlamaLM and its Scorer)",
    ("eval/backend.py", "_loglikelihood_tokens"): "scoring: packing, compiling, the forward passes",
}


def profile_eval(command: list[str], out: Path) -> None:
    """One more run of our eval command under cProfile, and where its time went (cProfile slows Python a
    little; the shares are what it says)."""
    import pstats

    timed([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "openllama.cli", *command[1:]])
    found: dict[str, float] = {}
    for (path, _, function), (_, _, _, cumulative, _) in pstats.Stats(str(out)).stats.items():
        for (ending, name), what in PROFILED.items():
            if path.replace("\\", "/").endswith(ending) and function == name:
                found[what] = max(found.get(what, 0.0), cumulative)
    print("  where `openllama eval` spends its time (cProfile, one run): " +
          "; ".join(f"{what} {seconds:.1f} s" for what, seconds in found.items()))


def bench_eval(scratch: Path, rounds: int) -> None:
    from openllama.data.tokenizer import train_sentencepiece
    from openllama.eval.task_texts import TASK_PACK
    from openllama.train.checkpoint import save_model
    from openllama.train.convert.hf import export_hf
    from openllama.train.model import LlamaConfig, init_params

    texts = [json.loads(line)["text"] for path in sorted(SAMPLE.glob("*.jsonl")) for line in open(path)][:400]
    tokenizer = train_sentencepiece(texts, scratch / "tokenizer", vocab_size=512)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, max_position_embeddings=512)
    ckpt = save_model(scratch / "ckpt", init_params(config, seed=0), config, tokenizer)
    hf_dir = export_hf(ckpt, scratch / "hf")
    cores = os.cpu_count() or 1
    print(f"eval: {config.num_params() / 1e6:.0f}M parameters, float32, tasks {TASKS}, batch size 16, {cores} cores")
    ours = [str(BIN / "openllama"), "eval", str(ckpt), "--tasks", TASKS, "--batch-size", "16", "--no-mlflow",
            "--no-compare", "--output"]

    def accuracies(results: dict) -> dict[str, float]:
        return {task: round(values["acc,none"], 6) for task, values in results.items() if "acc,none" in values}

    def run_ours(round_: int) -> tuple[float, dict]:
        out = scratch / f"openllama-{round_}"
        _, seconds, _ = timed([*ours, str(out)])
        return seconds, accuracies(json.loads((out / "results.json").read_text())["results"])

    def run_hf(round_: int) -> tuple[float, dict]:
        out = scratch / f"hf-{round_}"
        _, seconds, _ = timed([str(BIN / "lm_eval"), "--model", "hf", "--model_args",
                               f"pretrained={hf_dir},dtype=float32,add_bos_token=True", "--tasks", TASKS,
                               "--include_path", str(TASK_PACK), "--batch_size", "16", "--device", "cpu",
                               "--output_path", str(out)])
        (path,) = out.rglob("results_*.json")
        return seconds, accuracies(json.loads(path.read_text())["results"])

    ratios = []
    for number, took in enumerate(alternated(rounds, {"openllama": run_ours, "hf": run_hf}), start=1):
        (ours_s, ours_scores), (hf_s, hf_scores) = took["openllama"], took["hf"]
        assert ours_scores == hf_scores, (ours_scores, hf_scores)
        ratios.append(hf_s / ours_s)
        print(f"  round {number}: openllama {ours_s:.1f} s, lm-eval hf {hf_s:.1f} s; the same accuracies: "
              f"{hf_scores}")
    print(f"  openllama / lm-eval hf, end to end: {spread(ratios)} (target >= 2.0)")
    profile_eval([*ours, str(scratch / "profiled")], scratch / "eval.prof")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", default="tokenize,eval", help="comma-separated: tokenize, eval")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=200, help="the tokenize corpus's size")
    args = parser.parse_args()
    which = args.which.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-end-to-end-") as scratch:
        if "tokenize" in which:
            bench_tokenize(Path(scratch) / "tokenize", args.megabytes, args.rounds)
        if "eval" in which:
            bench_eval(Path(scratch) / "eval", args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
