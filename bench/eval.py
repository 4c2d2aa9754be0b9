"""Loglikelihood throughput: our `openllama` lm-eval backend vs lm-eval's `hf` backend, same weights and requests.

A ~100M-parameter LLaMA (OpenLLaMA's 32000-token vocabulary, hidden 768, 8 layers) with random weights
is saved as our checkpoint and exported with `export_hf`; both backends then score the same loglikelihood
requests (the local task pack's multiple-choice requests at 0 and 1 shots) in one call each, as lm-eval's
evaluator makes one call with every request of every task. Each round loads both backends afresh and
alternates which goes first, so that load from other processes falls on both alike; our time includes
XLA compiling every shape, every round. Prints requests/second, the ratio ours/hf, and the largest
difference between the two backends' answers. (`-P` keeps bench/ off sys.path, where another bench's
module names could shadow the standard library's.)

    .venv/bin/python -P bench/eval.py [--shots 2] [--batch-size 16] [--rounds 2] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def tokenizer_documents() -> list[str]:
    """Text to train the bench tokenizer on: the sample corpus if present, else the stdlib's sources."""
    docs = [
        json.loads(line)["text"]
        for path in sorted((REPO / "data" / "sample" / "redpajama").rglob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not docs:
        stdlib = Path(sysconfig.get_path("stdlib"))
        docs = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:60]]
    return docs[:400]


def pack_requests(shots: int) -> list:
    """Loglikelihood requests of the local pack's multiple-choice tasks at 0, 1, ..., shots-1 few-shot
    examples: distinct requests (no two alike), with contexts of growing length as in few-shot evals."""
    from lm_eval.tasks import TaskManager  # here rather than at the top, so --help answers at once

    from openllama.eval.run import TASK_PACK

    manager = TaskManager(include_path=str(TASK_PACK), include_defaults=False)
    requests = []
    for num_fewshot in range(shots):
        tasks = manager.load(["local_arc", "local_hellaswag", "local_piqa", "local_boolq"])["tasks"]
        for task in tasks.values():
            task.set_config(key="num_fewshot", value=num_fewshot)
            task.build_all_requests(rank=0, world_size=1)
            requests += task.instances
    return requests


def alternating(loaders: dict, requests: list, rounds: int) -> dict[str, tuple[float, list[float]]]:
    """{name: (seconds, loglikelihoods of the last round)}: each round loads every backend afresh and
    times one call over all requests, the order reversed every other round."""
    totals = {name: (0.0, []) for name in loaders}
    for round_ in range(rounds):
        for name in list(loaders)[:: 1 if round_ % 2 == 0 else -1]:
            lm = loaders[name]()
            begin = time.perf_counter()
            results = lm.loglikelihood(requests, disable_tqdm=True)
            totals[name] = (totals[name][0] + time.perf_counter() - begin, [r[0] for r in results])
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=2, help="request sets at 0..shots-1 few-shot examples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="calls per backend, alternating who goes first")
    parser.add_argument("--layers", type=int, default=8, help="hidden 768, vocab 32000: 8 layers is ~100M")
    args = parser.parse_args()

    # imported after the flags are read, so --help answers at once (torch, jax and lm-eval take seconds)
    import numpy as np
    import torch
    from lm_eval.models.huggingface import HFLM

    from openllama.data.tokenizer import train_sentencepiece
    from openllama.eval.backend import OpenLlamaLM
    from openllama.train.checkpoint import save_model
    from openllama.train.convert.hf import export_hf
    from openllama.train.model import LlamaConfig, init_params

    # The bench tokenizer has 512 pieces; the model keeps OpenLLaMA's 32000-row embedding and output
    # head (as a padded vocabulary), so the output layer costs what it costs in the real models.
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=args.layers,
                         num_attention_heads=12, max_position_embeddings=512)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tokenizer = train_sentencepiece(tokenizer_documents(), scratch / "tokenizer", vocab_size=512)
        ckpt = save_model(scratch / "ckpt", init_params(config, seed=0), config, tokenizer)
        hf_dir = export_hf(ckpt, scratch / "hf")
        requests = pack_requests(args.shots)
        print(f"model: {config.num_params() / 1e6:.0f}M parameters; {len(requests)} loglikelihood requests; "
              f"batch size {args.batch_size}; torch threads {torch.get_num_threads()}")

        loaders = {
            "openllama": lambda: OpenLlamaLM(str(ckpt), batch_size=args.batch_size),
            "hf": lambda: HFLM(pretrained=str(hf_dir), add_bos_token=True, batch_size=args.batch_size,
                               device="cpu", dtype="float32"),
        }
        (ours_s, ours_ll), (hf_s, hf_ll) = alternating(loaders, requests, args.rounds).values()

    n = len(requests) * args.rounds
    print(f"openllama: {n / ours_s:.2f} requests/s ({ours_s:.0f} s, XLA compilation included)")
    print(f"hf:        {n / hf_s:.2f} requests/s ({hf_s:.0f} s)")
    print(f"ratio openllama/hf: {hf_s / ours_s:.2f}x")
    print(f"max |loglikelihood difference|: {np.max(np.abs(np.array(ours_ll) - np.array(hf_ll))):.2e}")


if __name__ == "__main__":
    main()
