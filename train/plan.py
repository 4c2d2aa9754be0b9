"""`openllama plan CONFIG [key=value ...]`: a config's exact train step, compiled for its TPU slice on any machine.

The TPU compiler (libtpu, the `tpu` extra) runs without a TPU: it describes the slice's chips as
compile-only devices, and the step `Trainer` would run (`program.make_program`) is lowered and
compiled for them. What the compiler reports, per chip:

- HBM: arguments + outputs - aliased (the donated state) + temporaries, against what a chip offers; and
  the host memory the step's offloaded activations take (remat policies that offload, `model.py`).
- Executed FLOPs, counted from the step's jaxpr rather than the compiler's cost analysis, which counts a
  loop body once (and the TPU compiler puts products in loops): every product, recompute included
  (remat bodies, scan x length, custom gradients), and the splash kernels' products over the causal
  blocks they visit. Compared with the model's 6N + attention FLOPs.
- Collective traffic, read from the compiled program with loops multiplied out: the bytes each chip
  sends for every all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (the compiler
  turns FSDP's gathers into permutes), by element type, compared with FSDP's minimum (`fsdp_minimum_bytes`:
  gather the weights forward and backward in the dtype their products use, reduce-scatter the gradients).

Exit 0 when the step fits within `--hbm-limit` of a chip's HBM (default 80%: the rest is headroom for
XLA's runtime buffers, fragmentation and the compiler's estimate), 1 when it does not, 2 for a config that
cannot run on its slice at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

from openllama import commands
from openllama.train import kernels
from openllama.train.config import TrainConfig, load_config
from openllama.train.program import make_program
from openllama.train.tpu import Slice, add_libtpu_flags, check_slice

GiB = 2**30
HBM_LIMIT = 0.8  # the share of a chip's HBM a step may plan to use and still "fit"
SPLASH_PRODUCTS = {"fwd": 2, "dq": 3, "dkv": 4}  # q.k and p.v forward; recompute + gradient products backward


@dataclass
class StepPlan:
    """What one training step costs on each chip of its slice (the `--json` output)."""

    config: str
    slice: str
    topology: str
    devices: int
    mesh: dict[str, int]
    fits: bool  # within hbm_limit of the chip's HBM
    hbm_needed_bytes: int
    hbm_capacity_bytes: int
    hbm_limit: float
    memory: dict[str, int]  # the compiler's arguments, outputs, aliased and temporaries, per chip
    host_bytes: int  # the host memory each chip's step takes (offloaded activations), beside its HBM
    executed_flops_per_step: float  # over the whole slice
    model_flops_per_step: float
    collective_bytes_per_step: float  # sent by each chip
    collective_bytes_by_kind: dict[str, float]  # by collective and element type: "all-gather bf16"
    fsdp_minimum_bytes_per_step: float
    compile_seconds: float
    kernels: str
    remat_policy: str

    @property
    def flops_ratio(self) -> float:
        return self.executed_flops_per_step / self.model_flops_per_step

    @property
    def collective_ratio(self) -> float:
        return self.collective_bytes_per_step / max(self.fsdp_minimum_bytes_per_step, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops_ratio": self.flops_ratio, "collective_ratio": self.collective_ratio}


def compile_only_devices(tpu: Slice) -> list:
    """The chips of `tpu` as devices the TPU compiler can target from a machine without them."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask on this machine
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{tpu.generation}:{tpu.topology}", chip_config_name="megacore",
            chips_per_host_bounds=tpu.host_bounds, num_slices=1,
        )
    except (RuntimeError, ValueError) as error:
        if "lockfile" in str(error):  # libtpu serves one process at a time on a machine
            raise commands.WorkFailed("another process is using the TPU compiler (libtpu holds "
                                      "/tmp/libtpu_lockfile while it runs); run one plan at a time") from error
        raise commands.BadInput(f"the TPU compiler is not available ({error}); install it with "
                                "pip install 'openllama-ray[tpu]'") from error
    return description.devices


def target_slice(config: TrainConfig) -> Slice:
    """The slice `config` trains on, after the check Ray Train makes (and ours: one worker per host)."""
    if not config.scaling.use_tpu:
        raise commands.BadInput("plan compiles for a TPU slice: the config needs scaling.use_tpu=true with "
                                "scaling.accelerator_type and scaling.topology")
    return check_slice(config.scaling.num_workers, config.scaling.accelerator_type, config.scaling.topology)


def plan(config: TrainConfig, name: str, hbm_limit: float = HBM_LIMIT) -> StepPlan:
    """Compile `config`'s train step for its slice and measure it; it fits within `hbm_limit` of HBM."""
    tpu = target_slice(config)
    llama, runtime = config.llama(), config.runtime()
    runtime = dataclasses.replace(runtime, kernels=kernels.for_platform(runtime.kernels, "tpu"))
    add_libtpu_flags(config.device.libtpu_flags)
    devices = compile_only_devices(tpu)
    program = make_program(config, devices, runtime)
    state, batch = program.abstract_state, program.abstract_batch(config)
    started = time.perf_counter()
    with jax.set_mesh(program.mesh):
        jaxpr = jax.make_jaxpr(program.step_function)(state, batch)
        lowered = program.train_step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as error:  # the compiler refuses a program whose temporaries overflow
            compiled, refused = None, too_large(str(error))
    seconds = time.perf_counter() - started
    if compiled is not None:
        memory = compiled.memory_analysis()
        sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                 "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes}
        host = (memory.host_argument_size_in_bytes + memory.host_output_size_in_bytes
                - memory.host_alias_size_in_bytes + memory.host_temp_size_in_bytes)
        by_kind = collective_bytes(compiled.as_text())
    else:
        # the donated state is the arguments, the outputs and what they alias; the rest is temporaries
        state_bytes = int(sum(np.dtype(leaf.dtype).itemsize * math.prod(leaf.sharding.shard_shape(leaf.shape))
                              for leaf in jax.tree.leaves(state)))
        sizes = {"arguments": state_bytes, "outputs": state_bytes, "aliased": state_bytes, "temporaries": refused}
        host, by_kind = 0, {}
    needed = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    shape = dict(program.mesh.shape)
    minimum = fsdp_minimum_bytes(llama.num_params(), shape["fsdp"], shape["dp"], np.dtype(runtime.dtype).itemsize,
                                 np.dtype(runtime.param_dtype).itemsize)
    return StepPlan(
        config=name, slice=tpu.name, topology=tpu.topology, devices=len(devices), mesh=shape,
        fits=needed <= hbm_limit * tpu.hbm_bytes, hbm_needed_bytes=int(needed), hbm_capacity_bytes=tpu.hbm_bytes,
        hbm_limit=hbm_limit,
        memory=sizes, host_bytes=int(host), executed_flops_per_step=executed_flops(jaxpr.jaxpr),
        model_flops_per_step=llama.flops_per_token(config.train.seq_len) * config.train.global_batch_size
        * config.train.seq_len,
        collective_bytes_per_step=sum(by_kind.values()), collective_bytes_by_kind=by_kind,
        fsdp_minimum_bytes_per_step=minimum, compile_seconds=seconds, kernels=runtime.kernels,
        remat_policy=runtime.remat_policy,
    )


def fsdp_minimum_bytes(params: int, fsdp: int, dp: int, compute_itemsize: int, param_itemsize: int) -> float:
    """What each chip must send per step under FSDP: gather every weight for the forward and again for the
    backward, in the dtype its product uses (each weight is cast before the product), and reduce-scatter the
    gradients in the parameters' dtype, over the fsdp axis; then, with dp > 1, all-reduce each chip's gradient
    shard over dp."""
    share = (fsdp - 1) / fsdp
    fsdp_bytes = (2 * compute_itemsize + param_itemsize) * params * share
    return fsdp_bytes + 2 * param_itemsize * (params / fsdp) * (dp - 1) / dp


def too_large(message: str) -> int:
    """The temporaries the compiler said it would need when it refused to build the step, in bytes."""
    match = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    if match is None:
        raise commands.WorkFailed(f"the TPU compiler failed: {message.splitlines()[0]}")
    return int(float(match.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)])


# ------------------------------------------------------------------------------------- executed FLOPs


def executed_flops(jaxpr: Any) -> float:
    """FLOPs of every product the step runs, over all devices (shard_map bodies count once per shard)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += dot_flops(eqn)
        elif name == "pallas_call":
            total += pallas_flops(eqn)
        else:
            inner = sum(executed_flops(sub) for sub in sub_jaxprs(eqn))
            total += inner * repeats(eqn) if inner else 0.0
    return total


def dot_flops(eqn: Any) -> float:
    """2 x output elements x contracted size."""
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def pallas_flops(eqn: Any) -> float:
    """The splash kernels' products over the causal blocks they compute (a kernel's body cannot be counted
    from its jaxpr: it runs once per grid cell and skips the blocks its mask leaves out)."""
    kind = next((k for k in SPLASH_PRODUCTS if f"_{k}_" in f"{eqn.params['name']}_"), None)
    if kind is None:
        raise ValueError(f"plan cannot count the FLOPs of the Pallas kernel {eqn.params['name']!r}")
    # the queries (or their gradient), the largest operand: [(batch,) heads, seq, head_dim]
    q = max((v.aval.shape for v in eqn.invars if len(v.aval.shape) >= 3), key=math.prod)
    batch, (heads, seq, head_dim) = math.prod(q[:-3]), q[-3:]
    blocks = seq // min(kernels.SPLASH_BLOCK, seq)
    causal_fraction = (blocks + 1) / (2 * blocks)
    return SPLASH_PRODUCTS[kind] * 2.0 * batch * heads * seq * seq * head_dim * causal_fraction


def sub_jaxprs(eqn: Any) -> Iterator[Any]:
    """The jaxprs an equation runs (jit, remat, custom gradients, scan and while bodies, shard_map); for
    cond, the costliest branch."""
    if eqn.primitive.name == "cond":
        yield max(eqn.params["branches"], key=lambda branch: executed_flops(branch.jaxpr)).jaxpr
        return
    for value in eqn.params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def repeats(eqn: Any) -> int:
    """How many times an equation's body runs: a scan's length, a shard_map's shards, a while loop's trips
    (only asked for when its body has products)."""
    if eqn.primitive.name == "scan":
        return int(eqn.params["length"])
    if eqn.primitive.name == "while":
        return while_trips(eqn)
    if eqn.primitive.name == "shard_map":
        mesh, axes = eqn.params["mesh"], eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes", ()))
        return math.prod(mesh.shape[axis] for axis in axes)
    return 1


def while_trips(eqn: Any) -> int:
    """A while loop's trip count, read from its jaxpr: a carried counter that starts at a constant, is raised
    by a constant each trip and is compared (< or <=) with a constant. Any other loop with products in it is
    refused: counting its body once (or guessing) would make the executed FLOPs say more than they measure."""
    params = eqn.params
    cond, body = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
    cond_consts, body_consts = params["cond_nconsts"], params["body_nconsts"]
    carried = eqn.invars[cond_consts + body_consts:]

    def constant(var: Any) -> int | None:
        value = getattr(var, "val", None) if isinstance(var, jax.extend.core.Literal) else None
        return int(value) if value is not None and np.ndim(value) == 0 else None

    def producer(jaxpr: Any, var: Any) -> Any:
        return next((e for e in jaxpr.eqns if any(out is var for out in e.outvars)), None)

    compare = producer(cond, cond.outvars[0])
    if compare is not None and compare.primitive.name in ("lt", "le") and compare.invars[0] in cond.invars:
        position = cond.invars.index(compare.invars[0]) - cond_consts
        bound, start = constant(compare.invars[1]), constant(carried[position]) if position >= 0 else None
        raise_by = producer(body, body.outvars[position])
        step = None
        if raise_by is not None and raise_by.primitive.name == "add" and \
                raise_by.invars[0] is body.invars[body_consts + position]:
            step = constant(raise_by.invars[1])
        if None not in (bound, start, step) and step > 0:
            end = bound + (compare.primitive.name == "le")
            return max(0, -(-(end - start) // step))
    raise ValueError("plan cannot count the FLOPs of a while loop whose trip count is not a constant counter "
                     "(write it as a scan, or lax.fori_loop with static bounds)")


# ------------------------------------------------------------------------------------- collective bytes


INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*?) ([a-z-]+)\((.*)$")
ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def array_bytes(shape: str) -> dict[str, int]:
    """Bytes of the arrays in an HLO shape by element type (a tuple adds its elements)."""
    total: dict[str, int] = {}
    for dtype, dims in ARRAY.findall(shape):
        itemsize = ITEMSIZE.get(dtype) or int(dtype[1:]) // 8
        total[dtype] = total.get(dtype, 0) + itemsize * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(attributes: str) -> int:
    """Devices in one replica group: `{{0,1},{2,3}}`, `[2,8]<=[16]` or `mesh['axis_0'=16] {'axis_0'}`."""
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attributes):
        sizes = {name: int(size) for name, size in re.findall(r"'(\w+)'=(\d+)", match.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", match.group(2)))
    if match := re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes):
        return int(match.group(2))
    if match := re.search(r"replica_groups=\{\{([\d,]*)\}", attributes):
        return len(match.group(1).split(","))
    return 1


def sent_bytes(kind: str, result_bytes: int, group: int) -> float:
    """Bytes one device sends in a ring implementation of the collective, from its result's size."""
    share = (group - 1) / group if group > 1 else 0.0
    if kind == "all-gather":
        return result_bytes * share
    if kind == "reduce-scatter":
        return result_bytes * (group - 1)
    if kind == "all-reduce":
        return 2 * result_bytes * share
    if kind == "all-to-all":
        return result_bytes * share
    return float(result_bytes)  # collective-permute: its whole result crosses a link


def collective_bytes(hlo: str) -> dict[str, float]:
    """Bytes each device sends per step, by collective kind and element type (`all-gather f32`), with every
    loop multiplied by its trip count."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if header := re.match(r"^(ENTRY )?%?([\w.-]+) \(.*\{$", line):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the compiled program")

    def trip_count(condition: str) -> int:
        bounds = [int(n) for line in computations.get(condition, []) for n in re.findall(r"constant\((\d+)\)", line)]
        return max(bounds, default=1)

    memo: dict[str, dict[str, float]] = {}

    def of(computation: str) -> dict[str, float]:
        if computation in memo:
            return memo[computation]
        totals: dict[str, float] = {}
        starts: dict[str, tuple[str, int]] = {}
        for line in computations.get(computation, []):
            match = INSTRUCTION.match(line)
            if match is None:
                continue
            name, shape, opcode, rest = match.groups()
            base = opcode.removesuffix("-start").removesuffix("-done")
            if base in COLLECTIVES and opcode.endswith("-start"):
                starts[name] = (base, group_size(rest))
            elif base in COLLECTIVES:
                kind, group = (starts.get(re.match(r"%?([\w.-]+)", rest).group(1), (base, 1))
                               if opcode.endswith("-done") else (base, group_size(rest)))
                for dtype, size in array_bytes(shape).items():
                    totals[f"{kind} {dtype}"] = totals.get(f"{kind} {dtype}", 0.0) + sent_bytes(kind, size, group)
            times = 1
            called = re.findall(r"(?:body|to_apply|calls)=%?([\w.-]+)", rest)
            called += re.findall(r"%?([\w.-]+)", m.group(1)) if (m := re.search(r"branch_computations=\{([^}]*)\}",
                                                                                 rest)) else []
            if opcode == "while":
                condition = re.search(r"condition=%?([\w.-]+)", rest)
                times = trip_count(condition.group(1)) if condition else 1
            for sub in called:
                for kind, value in of(sub).items():
                    totals[kind] = totals.get(kind, 0.0) + times * value
        memo[computation] = totals
        return totals

    return of(entry)


# ----------------------------------------------------------------------------------------------- command


def report(result: StepPlan) -> str:
    m = result.memory
    lines = [
        f"{result.config} on {result.slice} ({result.topology}, {result.devices} chips, mesh {result.mesh}), "
        f"kernels {result.kernels}, remat {result.remat_policy}: compiled in {result.compile_seconds:.0f} s",
        f"  HBM per chip   {result.hbm_needed_bytes / GiB:.2f} GiB of {result.hbm_capacity_bytes / GiB:.2f} GiB "
        f"({result.hbm_needed_bytes / result.hbm_capacity_bytes:.0%}): {'fits' if result.fits else 'DOES NOT FIT'} "
        f"within {result.hbm_limit:.0%} (arguments {m['arguments'] / GiB:.2f} + outputs "
        f"{m['outputs'] / GiB:.2f} - aliased {m['aliased'] / GiB:.2f} + temporaries {m['temporaries'] / GiB:.2f})",
        f"  host per chip  {result.host_bytes / GiB:.2f} GiB (activations the remat policy offloads)",
        f"  FLOPs/step     executed {result.executed_flops_per_step:.3e}, model {result.model_flops_per_step:.3e}: "
        f"{result.flops_ratio:.2f}x",
        f"  sent per chip  {result.collective_bytes_per_step / GiB:.2f} GiB/step, FSDP minimum "
        f"{result.fsdp_minimum_bytes_per_step / GiB:.2f} GiB: {result.collective_ratio:.2f}x ("
        + ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(result.collective_bytes_by_kind.items())) + ")",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openllama plan",
        description="Compile a config's train step for its TPU slice on this machine (no TPU needed) and report "
                    "HBM per chip, executed FLOPs and collective traffic. Exit 1 when the step does not fit "
                    "within --hbm-limit of HBM.",
        epilog=commands.EXIT_CODES,
    )
    parser.add_argument("config", help="a training config name (openllama-7b, ...) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. model.remat_policy=full")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--hbm-limit", type=float, default=HBM_LIMIT, metavar="SHARE",
                        help=f"the share of a chip's HBM the step may use and fit (default {HBM_LIMIT})")
    args = parser.parse_args(argv)
    if not 0 < args.hbm_limit <= 1:
        parser.error(f"--hbm-limit={args.hbm_limit} must be in (0, 1]")
    commands.quiet_libraries()
    jax.config.update("jax_platforms", "cpu")  # the slice's chips are compile-only; nothing runs here

    def work() -> int:
        config = load_config(args.config, args.overrides)
        tpu = target_slice(config)
        if not args.json:
            print(f"Ray: {config.scaling.num_workers} workers x {tpu.chips_per_host} chips = {tpu.chips} chips of "
                  f"{tpu.name} ({tpu.topology}): one worker per host, as Ray Train will place them")
        result = plan(config, args.config, args.hbm_limit)
        print(json.dumps(result.to_json(), indent=2) if args.json else report(result))
        return 0 if result.fits else 1

    return commands.run("openllama plan", work)
