"""Training-step throughput on this CPU: MFU against a matmul peak, and tokens/s against transformers.

Both baselines are measured in this run on this machine, for each compute precision: the peak is a
large `jnp.dot` in it, the comparison is Hugging Face's `LlamaForCausalLM` (torch, CPU) with the same
config, batch and AdamW. Parameters and optimizer state are float32 throughout; bfloat16 is the mixed
precision of the OpenLLaMA presets, which torch gets through `torch.autocast`.

    .venv/bin/python bench/train_cpu.py [--batch 4 --seq 256 --rounds 5 --dtype float32 bfloat16]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from openllama.train.model import LlamaConfig, ModelRuntime, init_params
from openllama.train.step import learning_rate, make_optimizer, make_train_step

# ~100M parameters: a GPT-2-small-sized LLaMA with an 8k vocabulary
CONFIG = LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=1024)


def alternating_seconds(ours: Callable[[], object], theirs: Callable[[], object], rounds: int) -> np.ndarray:
    """Seconds per call [rounds, 2], one call of each per round, in turn: the machine's drift hits both alike."""
    times = np.zeros((rounds, 2))
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            (ours, theirs)[i]()
            times[r, i] = time.perf_counter() - start
    return times


def matmul_peaks(dtype: str, n: int = 2048) -> tuple[float, float]:
    """FLOP/s of an n x n matmul in `dtype` through XLA (accumulating in float32), and through torch.

    The first is the MFU denominator; the second shows how fast the matrix kernels under the
    transformers baseline are on this CPU, which bounds the speed ratio a matmul-bound step can reach.
    """
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    x = jnp.asarray(a, dtype)
    dot = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    t = torch.from_numpy(a).to(getattr(torch, dtype))
    dot(x).block_until_ready(), t @ t  # compile, warm up
    best = alternating_seconds(lambda: dot(x).block_until_ready(), lambda: t @ t, rounds=10).min(axis=0)
    return 2 * n**3 / best[0], 2 * n**3 / best[1]


def jax_stepper(batch: np.ndarray, dtype: str) -> Callable[[], None]:
    """One compiled training step of ours, run to completion by each call."""
    runtime = ModelRuntime(dtype=dtype)
    schedule = learning_rate(3e-4, 3e-5, 1, 1000)
    optimizer = make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    params = init_params(CONFIG, 0, runtime)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    step = jax.jit(make_train_step(CONFIG, runtime, optimizer, schedule, 1, False), donate_argnums=0)
    tokens = jnp.asarray(batch)

    def one_step() -> None:
        nonlocal state
        state, metrics = step(state, tokens)
        jax.block_until_ready(metrics)

    one_step()  # compile
    return one_step


def torch_stepper(batch: np.ndarray, dtype: str) -> Callable[[], None]:
    """The same step in transformers: torch CPU, AdamW, clipping; bfloat16 through autocast."""
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = HFConfig(vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size,
                  intermediate_size=CONFIG.intermediate_size, num_hidden_layers=CONFIG.num_hidden_layers,
                  num_attention_heads=CONFIG.num_attention_heads, max_position_embeddings=1024,
                  rms_norm_eps=CONFIG.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.as_tensor(batch, dtype=torch.long)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def one_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()  # warm-up
    return one_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each, alternating")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="compute precisions to measure (parameters stay float32)")
    args = parser.parse_args()
    batch = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    tokens = args.batch * args.seq
    flops = CONFIG.flops_per_token(args.seq) * tokens
    print(f"model: {CONFIG.num_params() / 1e6:.0f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{jax.device_count()} CPU device(s)")
    for dtype in args.dtype:
        peak, torch_peak = matmul_peaks(dtype)
        times = alternating_seconds(jax_stepper(batch, dtype), torch_stepper(batch, dtype), args.rounds)
        jax_s, torch_s = np.median(times, axis=0)
        torch_name = "transformers (torch CPU" + (", autocast)" if dtype == "bfloat16" else ")")
        print(f"\n{dtype} compute, float32 parameters")
        print(f"matmul peak ({dtype} jnp.dot, measured): {peak / 1e9:.1f} GFLOP/s "
              f"(torch's own: {torch_peak / 1e9:.1f}, {torch_peak / peak:.2f}x)")
        print(f"{'openllama (JAX)':34s} {jax_s:.3f} s/step  {tokens / jax_s:8.0f} tokens/s  "
              f"MFU {flops / jax_s / peak:.1%}")
        print(f"{torch_name:34s} {torch_s:.3f} s/step  {tokens / torch_s:8.0f} tokens/s  "
              f"MFU {flops / torch_s / peak:.1%}")
        ratios = times[:, 1] / times[:, 0]
        print(f"speed vs transformers: {np.median(ratios):.2f}x (median of {args.rounds} rounds, "
              f"{ratios.min():.2f}-{ratios.max():.2f})   targets: MFU >= 40%, >= 1.0x")

if __name__ == "__main__":
    main()
