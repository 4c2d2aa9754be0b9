"""`openllama serve` throughput: 16 clients at once against the same 16 requests sent one at a time.

One endpoint (`openllama serve CKPT` on an in-process Ray of this machine, the default batch settings) serves a
model of the given preset with random weights. A round is 16 completions of `--max-tokens` tokens (greedy, a
different prompt each); it runs sequentially (one request in flight) and concurrently (16 threads), alternated,
after warm-up rounds at several concurrencies so that every padded batch size is compiled. Printed: generated
tokens per second of each, their ratio, as the median of the repeats with its spread, and how many rows the
concurrent decodes shared.

    python bench/serve.py [--preset tiny] [--max-tokens 64] [--clients 16] [--repeats 5] [--batch-wait-ms 10]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(work: Path, preset: str) -> Path:
    """A checkpoint of `preset` with random weights and a tokenizer trained on the shipped sample."""
    from openllama.data.tokenizer import train_sentencepiece
    from openllama.train.checkpoint import save_model
    from openllama.train.model import LlamaConfig, init_params

    config = LlamaConfig.preset(preset)
    documents = [json.loads(line)["text"] for path in sorted((REPO / "data" / "sample").rglob("*.jsonl"))
                 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = train_sentencepiece(documents[:400], work / "tokenizer", vocab_size=config.vocab_size)
    return save_model(work / "ckpt", init_params(config, seed=0), config, tokenizer)


def start_server(checkpoint: Path, port: int, batch_wait_ms: float) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "openllama.cli", "serve", str(checkpoint), "--name", "bench", "--port",
               str(port), "--batch-wait-ms", str(batch_wait_ms)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"openllama serve exited with {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("the endpoint did not answer within 300 s")


def complete(url: str, prompt: str, max_tokens: int) -> tuple[int, int]:
    """(completion tokens, rows of the batch it was decoded in) of one greedy request."""
    response = requests.post(url, json={"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0}, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"], int(response.headers["openllama-batch-rows"])


def round_of(url: str, prompts: list[str], max_tokens: int, at_once: bool) -> tuple[float, int]:
    """(generated tokens per second, largest batch) of the prompts sent at once or one after another."""
    started = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: complete(url, p, max_tokens), prompts))
    else:
        answers = [complete(url, p, max_tokens) for p in prompts]
    seconds = time.perf_counter() - started
    return sum(tokens for tokens, _ in answers) / seconds, max(rows for _, rows in answers)


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the checkpoint is made here; the server sets its own
    from openllama.eval.serve import ServeConfig
    from openllama.services import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-wait-ms", type=float, default=ServeConfig.batch_wait_ms)
    args = parser.parse_args()
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(args.clients)]
    one_at_a_time, together, shared = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = make_checkpoint(Path(scratch), args.preset)
        port = free_port()
        server = start_server(checkpoint, port, args.batch_wait_ms)
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            round_of(url, prompts[:1], args.max_tokens, at_once=False)
            # warm-up: the shapes batches start, grow and take rows in (powers of two) compiled before measuring
            for clients in (2, 3, 5, 9, 2, 3, 5, 9, *[args.clients] * 4):
                round_of(url, prompts[:clients], args.max_tokens, at_once=True)
            for repeat in range(args.repeats):
                sequential, _ = round_of(url, prompts, args.max_tokens, at_once=False)
                parallel, rows = round_of(url, prompts, args.max_tokens, at_once=True)
                one_at_a_time.append(sequential)
                together.append(parallel)
                shared.append(rows)
                print(f"repeat {repeat}: one at a time {sequential:.0f} tokens/s, {args.clients} at once "
                      f"{parallel:.0f} tokens/s (largest batch {rows} rows)", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)

    def figure(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} tokens/s (spread {min(values):.0f}-{max(values):.0f})"

    ratios = [t / s for t, s in zip(together, one_at_a_time, strict=True)]
    print(f"openllama serve, preset {args.preset}, {args.max_tokens} tokens a request, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} alternated rounds:")
    print(f"  {args.clients} requests one at a time: {figure(one_at_a_time)}")
    print(f"  {args.clients} clients at once:        {figure(together)}   (largest batch: {max(shared)} rows)")
    print(f"  at once / one at a time: {statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
