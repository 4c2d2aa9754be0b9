"""Forward and generation throughput: our jitted Flax model vs transformers' LlamaForCausalLM (torch, CPU).

Both run the same weights (ours exported with `export_hf`), float32, in this one process, timed in
alternation, so the printed ratios (> 1: ours faster) compare like with like on the machine that runs it.
Usage: python bench/forward.py [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: it reads this at import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from openllama.eval.decode import generate  # noqa: E402
from openllama.train.checkpoint import save_model  # noqa: E402
from openllama.train.convert.hf import export_hf  # noqa: E402
from openllama.train.model import Llama, LlamaConfig, init_params  # noqa: E402


def best_seconds(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` runs of each after a warm-up (compilation, allocator).

    Runs alternate between the two so that load from other processes hits both alike.
    """
    ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, record in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            run()
            record.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=args.layers, num_attention_heads=12, max_position_embeddings=512)
    print(f"model: {config.num_params() / 1e6:.0f}M params, batch {args.batch} x seq {args.seq}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    params = init_params(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "ckpt", params, config)
        hf_model = LlamaForCausalLM.from_pretrained(export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf"),
                                                    dtype=torch.float32).eval()

    ids = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.seq))
    forward = jax.jit(Llama(config).apply)
    torch_ids = torch.tensor(ids)
    with torch.no_grad():
        ours, theirs = best_seconds(
            lambda: forward({"params": params}, jnp.asarray(ids))[0].block_until_ready(),
            lambda: hf_model(torch_ids).logits,
            args.repeats,
        )
    tokens = args.batch * args.seq
    print(f"forward   tokens/s  ours {tokens / ours:9.0f}  transformers {tokens / theirs:9.0f}  "
          f"ratio {theirs / ours:.2f}x")

    prompt = ids[0, :16].tolist()
    with torch.no_grad():
        ours, theirs = best_seconds(
            lambda: generate(params, config, prompt, args.new_tokens, stop_ids=()),
            lambda: hf_model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0),
            args.repeats,
        )
    print(f"generate  tokens/s  ours {args.new_tokens / ours:9.1f}  transformers {args.new_tokens / theirs:9.1f}  "
          f"ratio {theirs / ours:.2f}x  (batch 1, greedy, KV cache)")


if __name__ == "__main__":
    main()
