"""The 7B preset against EasyLM's choices for OpenLLaMA 7B, each compiled for v4-512 by the TPU compiler.

EasyLM's `examples/pretrain_llama_7b.sh` (the recipe OpenLLaMA 7B was trained with) differs from our preset in
compute dtype (`--dtype='fp32'`), mesh (`--mesh_dim='-1,64,1'`: dp 4 x fsdp 64 on 256 chips) and the libtpu
flags it exports (the preset adds one that turns the weights' gathers into all-gathers). Each variant changes
one of them; `openllama plan` measures it on the same step (HBM per
chip within the 80% limit, executed / model FLOPs, bytes each chip sends by collective and element type).
The optimizer settings need no compile: the presets take EasyLM's (`optimizer.decay: all`, tests assert it).

    python -P bench/recipe.py [--preset openllama-7b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OPENLLAMA = str(Path(sys.executable).parent / "openllama")
# exported by EasyLM's script, less `--xla_tpu_spmd_rewrite_einsum_with_reshape=true`, which libtpu 0.0.42 no
# longer knows (it aborts on it); TPU_MEGACORE=MEGACORE_DENSE is the chip mode our plan compiles for anyway
EASYLM_LIBTPU_FLAGS = ("--xla_jf_spmd_threshold_for_windowed_einsum_mib=0 "
                       "--xla_tpu_spmd_threshold_for_allgather_cse=10000 "
                       "--xla_enable_async_all_gather=true "
                       "--xla_tpu_enable_latency_hiding_scheduler=true")
VARIANTS = {  # name: overrides of the preset, each one EasyLM choice
    "ours (the preset: bf16 compute, fsdp 256, its libtpu flags)": [],
    "EasyLM's compute dtype: model.dtype=float32": ["model.dtype=float32"],
    "EasyLM's mesh: dp 4 x fsdp 64": ["mesh.dp=4", "mesh.fsdp=64"],
    "EasyLM's libtpu flags (the 4 libtpu 0.0.42 knows) instead of the preset's": [
        f'device.libtpu_flags="{EASYLM_LIBTPU_FLAGS}"'],
}


def plan(preset: str, overrides: list[str]) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "LIBTPU_INIT_ARGS": ""}
    done = subprocess.run([OPENLLAMA, "plan", preset, *overrides, "--json"], env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="openllama-7b")
    args = parser.parse_args()
    print(f"| {args.preset} variant | HBM per chip | fits (≤ 80%) | executed / model FLOPs | sent per chip per step "
          "(by collective and element type) | collectives / FSDP minimum | compile |\n|---|---|---|---|---|---|---|")
    for name, overrides in VARIANTS.items():
        p = plan(args.preset, overrides)
        if "error" in p:
            print(f"| {name} | failed: {p['error']} | | | | | |", flush=True)
            continue
        share = p["hbm_needed_bytes"] / p["hbm_capacity_bytes"]
        sent = ", ".join(f"{kind} {value / 2**30:.1f}" for kind, value in sorted(p["collective_bytes_by_kind"].items())
                         if value >= 2**28)
        print(f"| {name} | {p['hbm_needed_bytes'] / 2**30:.1f} GiB ({share:.0%}) | {'yes' if p['fits'] else 'no'} | "
              f"{p['flops_ratio']:.2f}x | {p['collective_bytes_per_step'] / 2**30:.1f} GiB ({sent}) | "
              f"{p['collective_ratio']:.2f}x | {p['compile_seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
