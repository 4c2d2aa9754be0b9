"""MFU of the training step on one NVIDIA H100/H200: a ~1B LLaMA, seq 2048, bfloat16 compute.

Standalone: needs only jax[cuda], flax and optax plus this repository's `train/` and `platform/` folders
(the package need not be installed). Each variant is built and timed in this run, in turn: cuDNN flash
attention (`model.kernels=cudnn`, what `auto` picks on GPU) against the plain reference attention as the
baseline, each with the given remat policy and without remat. Prints step time, tokens/s, MFU against the
GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM) and the ratio to the baseline. Goal: MFU >= 50%.
Without a GPU it says so and exits 0 (`make bench` runs every script).

    python bench/train_gpu.py [--batch 8 --remat full --steps 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_openllama() -> None:
    """Make `openllama.train` importable from the source tree when the package is not installed."""
    try:
        import openllama.train.step  # noqa: F401
        return
    except ImportError:
        pass
    for name, folder in (("openllama", REPO / "platform"), ("openllama.train", REPO / "train")):
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--remat", default="full", help="none, full, dots or dots_no_batch (also run: none)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s")
    args = parser.parse_args()

    import_openllama()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from openllama.train.model import LlamaConfig, ModelRuntime, init_params
    from openllama.train.step import learning_rate, make_optimizer, make_train_step
    device = jax.devices()[0]
    if device.platform != "gpu":
        print(f"bench/train_gpu.py: no GPU here (JAX runs on {device.platform}); nothing measured")
        return
    peak = args.peak_flops or next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)
    if peak is None:
        sys.exit(f"unknown peak for {device.device_kind!r}; pass --peak-flops")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (args.batch, args.seq + 1)), jnp.int32)
    schedule = learning_rate(3e-4, 3e-5, 10, 1000)
    optimizer = make_optimizer(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)

    def measure(kernels: str, remat: str) -> float | None:
        """Median step seconds of one variant, or None when it does not fit in the GPU's memory."""
        config = LlamaConfig.preset("1b", max_position_embeddings=args.seq)
        runtime = ModelRuntime(param_dtype="float32", dtype="bfloat16", remat_policy=remat, kernels=kernels)

        def fresh_state():
            params = init_params(config, 0, runtime)
            return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}

        try:
            state = jax.jit(fresh_state)()
            step = jax.jit(make_train_step(config, runtime, optimizer, schedule, args.micro_batches, False),
                           donate_argnums=0)
            state, metrics = step(state, tokens)
            jax.block_until_ready(metrics)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                state, metrics = step(state, tokens)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
        except jax.errors.JaxRuntimeError as error:  # out of memory without remat
            print(f"  {kernels:<9} remat {remat:<13} does not run: {str(error).splitlines()[0][:120]}")
            return None
        seconds = float(np.median(times))
        flops = config.flops_per_token(args.seq) * args.batch * args.seq
        print(f"  {kernels:<9} remat {remat:<13} step {seconds:.3f} s  {args.batch * args.seq / seconds:>7.0f} "
              f"tokens/s  MFU {flops / seconds / peak:.1%}  loss {float(metrics['loss']):.3f}", flush=True)
        return seconds

    print(f"device: {device.device_kind}; 1b model; batch {args.batch} x {args.seq}; peak {peak / 1e12:.0f} TFLOP/s")
    results = {(k, r): measure(k, r) for k in ("reference", "cudnn") for r in dict.fromkeys((args.remat, "none"))}
    for remat in dict.fromkeys((args.remat, "none")):
        baseline, fused = results[("reference", remat)], results[("cudnn", remat)]
        if baseline and fused:
            print(f"remat {remat}: cudnn {baseline / fused:.2f}x the reference attention's speed")


if __name__ == "__main__":
    main()
