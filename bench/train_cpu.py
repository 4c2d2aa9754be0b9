"""Training-step throughput on this CPU: MFU against a matmul peak, and tokens/s against transformers.

Both baselines are measured in this run on this machine, for each compute precision: the peak is a
large `jnp.dot` in it, the comparison is Hugging Face's `LlamaForCausalLM` (torch, CPU) with the same
config, batch and AdamW. Parameters and optimizer state are float32 throughout; bfloat16 is the mixed
precision of the OpenLLaMA presets, which torch gets through `torch.autocast`.

    .venv/bin/python bench/train_cpu.py [--batch 4 --seq 256 --steps 3 --dtype float32 bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from openllama.train.model import LlamaConfig, init_params
from openllama.train.step import learning_rate, make_optimizer, make_train_step

# ~100M parameters: a GPT-2-small-sized LLaMA with an 8k vocabulary
CONFIG = LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=1024)


def matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in `dtype` (accumulated in float32), the best this CPU does through XLA."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    dot = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def jax_step_seconds(batch: np.ndarray, steps: int, dtype: str) -> float:
    config = dataclasses.replace(CONFIG, dtype=dtype)
    schedule = learning_rate(3e-4, 3e-5, 1, 1000)
    optimizer = make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    params = init_params(config, 0)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    step = jax.jit(make_train_step(config, optimizer, schedule, 1, False), donate_argnums=0)
    tokens = jnp.asarray(batch)
    state, metrics = step(state, tokens)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def torch_step_seconds(batch: np.ndarray, steps: int, dtype: str) -> float:
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
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="compute precisions to measure (parameters stay float32)")
    args = parser.parse_args()
    batch = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    tokens = args.batch * args.seq
    flops = CONFIG.flops_per_token(args.seq) * tokens
    print(f"model: {CONFIG.num_params() / 1e6:.0f}M parameters, batch {args.batch} x {args.seq} tokens, "
          f"{jax.device_count()} CPU device(s)")
    for dtype in args.dtype:
        peak = matmul_peak(dtype)
        jax_s = jax_step_seconds(batch, args.steps, dtype)
        torch_s = torch_step_seconds(batch, args.steps, dtype)
        torch_name = "transformers (torch CPU" + (", autocast)" if dtype == "bfloat16" else ")")
        print(f"\n{dtype} compute, float32 parameters")
        print(f"matmul peak ({dtype} jnp.dot, measured): {peak / 1e9:.1f} GFLOP/s")
        print(f"{'openllama (JAX)':33s} {jax_s:.3f} s/step  {tokens / jax_s:8.0f} tokens/s  "
              f"MFU {flops / jax_s / peak:.1%}")
        print(f"{torch_name:33s} {torch_s:.3f} s/step  {tokens / torch_s:8.0f} tokens/s  "
              f"MFU {flops / torch_s / peak:.1%}")
        print(f"speed vs transformers: {torch_s / jax_s:.2f}x   (targets: MFU >= 40%, >= 1.0x)")


if __name__ == "__main__":
    main()
