"""The published presets compiled for their TPU slices by the TPU compiler on this machine (`make plan`).

Each preset is planned in a process of its own (a 7B compile holds several GiB of host memory) and the
table of docs/tpu.md is printed: HBM per chip against a v4 chip's, executed against model FLOPs, each
chip's collective traffic against FSDP's minimum. Extra `key=value` settings apply to every preset, e.g.
`python -P bench/plan.py model.remat_policy=full` to compare remat policies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PRESETS = ["openllama-3b", "openllama-7b", "openllama-13b"]
OPENLLAMA = str(Path(sys.executable).parent / "openllama")


def plan(preset: str, overrides: list[str]) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
    done = subprocess.run([OPENLLAMA, "plan", preset, *overrides, "--json"], env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"plan {preset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> int:
    overrides = sys.argv[1:]
    print("| config | slice | remat | HBM per chip | fits (≤ 80%) | host memory per chip (offloaded) | executed / "
          "model FLOPs | collectives / FSDP minimum | compile |\n|---|---|---|---|---|---|---|---|---|")
    fit = True
    for preset in PRESETS:
        p = plan(preset, overrides)
        share = p["hbm_needed_bytes"] / p["hbm_capacity_bytes"]
        fit = fit and p["fits"]
        print(f"| {preset} | {p['slice']} ({p['devices']} chips) | {p['remat_policy']} | "
              f"{p['hbm_needed_bytes'] / 2**30:.1f} of {p['hbm_capacity_bytes'] / 2**30:.2f} GiB ({share:.0%}) | "
              f"{'yes' if p['fits'] else 'no'} | {p['host_bytes'] / 2**30:.1f} GiB | {p['flops_ratio']:.2f}x | "
              f"{p['collective_ratio']:.2f}x | "
              f"{p['compile_seconds']:.0f} s |", flush=True)
    return 0 if fit else 1


if __name__ == "__main__":
    sys.exit(main())
