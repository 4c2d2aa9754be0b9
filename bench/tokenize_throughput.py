"""End-to-end tokenization throughput: our Ray Data pipeline vs Hugging Face `datasets` vs raw SentencePiece.

All three run in this process on the same corpus and tokenizer, so the ratios hold on any machine. The corpus
is one large file by default (the case of RedPajama's book, wikipedia and stackexchange subsets), which our
pipeline cuts into line-aligned byte spans so that every core works on it:
  ours      `tokenize_dataset`: read jsonl, validate, tokenize, pack into seq_len rows, write the shards
  datasets  `load_dataset("json")` + `map(batched=True, num_proc=cores)` + `to_parquet` (no validation, no packing)
  raw       SentencePiece `encode(texts, num_threads=cores)` on texts already in memory (an upper bound)
Peak memory of our pipeline (driver and the largest Ray worker) is printed for two corpus sizes whose files
differ in size, to show it does not grow with the corpus.

    .venv/bin/python bench/tokenize_throughput.py [--megabytes 256] [--files 1] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil
import sentencepiece as spm

from openllama import ray_jobs
from openllama.data.pack import tokenize_dataset
from openllama.data.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "redpajama"
FILES_PER_CORPUS = 16
LAYOUT = {  # full-RedPajama file names, cycled over the corpus files
    "arxiv": "arxiv/arxiv_{:04d}.jsonl", "c4": "c4/c4-train.{:05d}-of-01024.jsonl",
    "github": "github/filtered_{:04d}.sampled.jsonl", "wikipedia": "wikipedia/wiki{:02d}/wiki.jsonl",
}


def sample_records() -> dict[str, list[str]]:
    records = {}
    for subset, name in [("arxiv", "arxiv"), ("c4", "c4"), ("github", "github"), ("wikipedia", "wikipedia")]:
        with open(SAMPLE / f"{name}_sample.jsonl", encoding="utf-8") as f:
            records[subset] = [line for line in f if line.strip()]
    return records


def make_corpus(root: Path, megabytes: int, seed: int = 0, files: int = FILES_PER_CORPUS) -> list[str]:
    """`files` jsonl files totalling `megabytes`, made by reshuffling the sample corpus's records."""
    rng = random.Random(seed)
    records = sample_records()
    per_file = megabytes * 1_000_000 // files
    paths = []
    for number in range(files):
        subset = sorted(LAYOUT)[number % len(LAYOUT)]
        path = root / LAYOUT[subset].format(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with open(path, "w", encoding="utf-8") as f:
            while size < per_file:
                line = rng.choice(records[subset])
                f.write(line)
                size += len(line.encode())
        paths.append(str(path))
    return paths


class PeakRss:
    """Samples RSS of this process and of its Ray worker processes (`ray::...`) every 50 ms."""

    def __init__(self):
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for child in me.children(recursive=True):
                try:
                    if child.name().startswith("ray::"):
                        self.worker = max(self.worker, child.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_ours(files: list[str], tokenizer: str, out: Path) -> tuple[float, int, PeakRss]:
    with PeakRss() as peak:
        start = time.perf_counter()
        manifest = tokenize_dataset(files, tokenizer, str(out), seq_len=2048, track=False)
        seconds = time.perf_counter() - start
    return seconds, manifest["stats"]["total"]["tokens"], peak


def run_datasets(files: list[str], tokenizer: str, out: Path, cores: int) -> tuple[float, int]:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets  # after the offline switches, which `datasets` reads when imported

    datasets.disable_progress_bars()

    def encode(batch):
        processor = spm.SentencePieceProcessor(model_file=tokenizer)
        return {"input_ids": processor.encode(batch["text"], add_bos=True, add_eos=True, num_threads=1)}

    start = time.perf_counter()
    # meta differs per subset, so it is read as a JSON string (as our pipeline keeps it)
    features = datasets.Features({"text": datasets.Value("string"), "meta": datasets.Value("string")})
    dataset = datasets.load_dataset("json", data_files=files, split="train", features=features,
                                    cache_dir=str(out / "cache"))
    tokenized = dataset.map(encode, batched=True, batch_size=1000, num_proc=cores,
                            remove_columns=dataset.column_names)
    tokenized.to_parquet(str(out / "tokens.parquet"))
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for batch in tokenized.iter(batch_size=10_000) for ids in batch["input_ids"])
    return seconds, tokens


def run_raw(files: list[str], tokenizer: str, cores: int) -> tuple[float, int]:
    texts = [json.loads(line)["text"] for path in files for line in open(path, encoding="utf-8")]
    processor = spm.SentencePieceProcessor(model_file=tokenizer)
    start = time.perf_counter()
    ids = processor.encode(texts, add_bos=True, add_eos=True, num_threads=cores)
    seconds = time.perf_counter() - start
    return seconds, sum(map(len, ids))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--files", type=int, default=1, help="input files (default one: the cores share it by spans)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        tmp = Path(tmp)
        texts = [json.loads(line)["text"] for path in sorted(SAMPLE.glob("*.jsonl")) for line in open(path)]
        tokenizer = str(train_sentencepiece(texts, tmp / "tokenizer", vocab_size=args.vocab_size))
        files = make_corpus(tmp / "corpus", args.megabytes, files=args.files)
        bigger = make_corpus(tmp / "corpus2x", 2 * args.megabytes, seed=1, files=args.files)
        start = time.perf_counter()
        ray_jobs.connect(log_to_driver=False, configure_logging=False)
        print(f"corpus {args.megabytes} MB in {len(files)} file(s), vocab {args.vocab_size}, {cores} cores; "
              f"Ray started in {time.perf_counter() - start:.1f}s (not counted below)")

        # Ray starts worker processes on first use; a small run first so that start-up is not timed. The same
        # command on a 1 MB file is its fixed cost (planning, ledger, tails, manifest): steady state is the rest.
        run_ours(make_corpus(tmp / "warm-up", 2, files=2), tokenizer, tmp / "warm-up-out")
        fixed_s, _, _ = run_ours(make_corpus(tmp / "fixed", 1, files=1), tokenizer, tmp / "fixed-out")
        ours_s, ours_tokens, peak = run_ours(files, tokenizer, tmp / "ours")
        _, _, peak2 = run_ours(bigger, tokenizer, tmp / "ours2x")  # before the others bloat this process
        hf_s, hf_tokens = run_datasets(files, tokenizer, tmp / "hf", cores)
        raw_s, raw_tokens = run_raw(files, tokenizer, cores)
        assert ours_tokens == hf_tokens == raw_tokens, (ours_tokens, hf_tokens, raw_tokens)
        seconds = {"ours": ours_s, "ours, steady state": ours_s - fixed_s, "datasets": hf_s, "raw": raw_s}
        rate = {name: ours_tokens / s for name, s in seconds.items()}
        for name, tokens_per_s in rate.items():
            print(f"{name:<19} {tokens_per_s / 1e6:6.2f} M tokens/s ({seconds[name]:.1f} s)")
        print(f"fixed cost of the command (the same run on a 1 MB file): {fixed_s:.1f} s")
        print(f"ours / datasets, end to end = {rate['ours'] / rate['datasets']:.2f}x (target >= 1.0)")
        print(f"ours / raw sentencepiece on {cores} cores, steady state = "
              f"{rate['ours, steady state'] / rate['raw']:.2f}x (target >= 0.9); end to end "
              f"{rate['ours'] / rate['raw']:.2f}x")
        mib = 1 << 20
        print(f"peak RSS, {args.megabytes} MB corpus: driver {peak.driver / mib:.0f} MiB, "
              f"largest worker {peak.worker / mib:.0f} MiB")
        print(f"peak RSS, {2 * args.megabytes} MB corpus (files twice as large): driver {peak2.driver / mib:.0f} MiB, "
              f"largest worker {peak2.worker / mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
