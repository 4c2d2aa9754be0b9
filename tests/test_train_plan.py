"""`openllama plan`: the train step compiled by the TPU compiler itself for a slice this machine does not have.

Small models on a v4-8 (one host) and a v4-32 (four hosts) keep each compile to seconds; the published
presets are planned by `bench/plan.py` (`make plan`), not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from openllama.train import kernels
from openllama.train.plan import collective_bytes, executed_flops, fsdp_minimum_bytes, group_size, sent_bytes

TINY_ON = {
    "v4-8": ["scaling.topology=2x2x1", "scaling.num_workers=1"],
    "v4-32": ["scaling.topology=2x2x4", "scaling.num_workers=4"],
}
TINY = ["scaling.use_tpu=true", "scaling.accelerator_type=TPU-V4", "mesh.dp=1", "mesh.fsdp=-1",
        "train.global_batch_size=16", "train.seq_len=256", "model.dtype=bfloat16"]


def plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
    return subprocess.run([sys.executable, "-m", "openllama.cli", "plan", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module", params=sorted(TINY_ON))
def planned(request) -> dict:
    done = plan("tiny-cpu", *TINY, *TINY_ON[request.param], "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_step_is_compiled_for_every_chip_of_the_slice(planned):
    chips = {"v4-8": 4, "v4-32": 16}[planned["slice"]]
    assert planned["devices"] == chips and planned["mesh"] == {"dp": 1, "fsdp": chips, "tp": 1}
    assert planned["compile_seconds"] > 0


def test_memory_is_the_compilers_arguments_outputs_and_temporaries(planned):
    m = planned["memory"]
    assert planned["hbm_needed_bytes"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    assert m["aliased"] > 0  # the donated train state
    assert planned["fits"] and planned["hbm_needed_bytes"] < planned["hbm_capacity_bytes"] == int(30.75 * 2**30)
    assert planned["host_bytes"] == 0  # nothing offloaded without a policy that offloads


def test_offloaded_keys_and_values_are_host_memory_not_hbm():
    done = plan("tiny-cpu", *TINY, *TINY_ON["v4-8"], "model.remat_policy=q_saved_kv_offloaded", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    offloaded = json.loads(done.stdout)
    keys_and_values = 2 * 2 * (16 // 4) * 256 * 64 * 2  # layers x (k, v) x rows per chip x positions x width x bf16
    assert offloaded["host_bytes"] >= keys_and_values


def test_executed_flops_cover_the_model_and_the_cpu_kernels_stay_off_the_tpu(planned):
    assert planned["kernels"] == "splash"
    assert 1.0 <= planned["executed_flops_per_step"] / planned["model_flops_per_step"] < 2.0


def test_collectives_are_counted_on_a_multi_host_slice(planned):
    if planned["slice"] == "v4-8":
        pytest.skip("measured on the multi-host slice")
    assert planned["collective_bytes_per_step"] > 0 and planned["fsdp_minimum_bytes_per_step"] > 0
    assert sum(v for k, v in planned["collective_bytes_by_kind"].items() if k.startswith("all-gather ")) > 0


def test_a_step_that_does_not_fit_exits_1_and_says_so():
    huge = ["model.overrides={vocab_size: 32000}", "train.global_batch_size=4096"]
    done = plan("tiny-cpu", *TINY, *TINY_ON["v4-8"], *huge)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "DOES NOT FIT" in done.stdout
    assert "Ray: 1 workers x 4 chips = 4 chips of v4-8 (2x2x1)" in done.stdout


def test_fits_means_within_the_hbm_limit_and_the_exit_code_follows(planned):
    """80% of HBM by default; a step that fits the chip but not the limit is exit 1."""
    assert planned["hbm_limit"] == 0.8
    share = planned["hbm_needed_bytes"] / planned["hbm_capacity_bytes"]
    done = plan("tiny-cpu", *TINY, *TINY_ON["v4-8"], "--hbm-limit", f"{share / 2:.6f}")
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"({share:.0%}): DOES NOT FIT within {share / 2:.0%}" in done.stdout
    refused = plan("tiny-cpu", *TINY, *TINY_ON["v4-8"], "--hbm-limit", "1.5")
    assert refused.returncode == 2 and "--hbm-limit=1.5 must be in (0, 1]" in refused.stderr


def test_the_configs_libtpu_flags_reach_the_compiler_plan_runs():
    """libtpu refuses a flag it does not know: the one in device.libtpu_flags must have reached it."""
    done = plan("tiny-cpu", *TINY, *TINY_ON["v4-8"], "device.libtpu_flags=--xla_openllama_no_such_flag=true")
    assert done.returncode != 0
    assert "Unknown command line flag 'xla_openllama_no_such_flag'" in done.stdout + done.stderr


def test_a_config_for_no_tpu_slice_is_bad_input_in_one_line():
    done = plan("tiny-cpu")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("openllama plan: plan compiles for a TPU slice")


def test_a_worker_count_ray_would_misplace_is_refused_before_compiling():
    done = plan("tiny-cpu", *TINY, "scaling.topology=2x2x4", "scaling.num_workers=8")
    assert done.returncode == 2 and "set scaling.num_workers=4 (one worker per host)" in done.stderr


# --- the counters, on programs whose answers are known ----------------------------------------------------


def test_flops_count_products_in_scans_remat_and_gradients():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 32))
    product = 2 * 8 * 16 * 32
    assert executed_flops(jax.make_jaxpr(lambda x, y: x @ y)(a, b).jaxpr) == product

    def scanned(x, y):
        return jax.lax.scan(lambda c, _: (c, c @ y), x, None, length=5)[1]

    assert executed_flops(jax.make_jaxpr(scanned)(a, b).jaxpr) == 5 * product
    def two_products(x, y):
        return jnp.sum(jnp.tanh(x @ y) @ y.T)

    def counted(f):
        return executed_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(a, b).jaxpr)

    plain = counted(two_products)
    remat = counted(jax.checkpoint(two_products, policy=jax.checkpoint_policies.nothing_saveable))
    assert plain == 6 * product  # two products forward, two gradient products for each of them
    assert remat == plain + product  # the backward pass runs x @ y again for tanh's input


def test_flops_count_a_shard_map_body_once_per_shard():
    mesh = jax.sharding.AbstractMesh((4,), ("x",))
    a, b = jnp.ones((8, 16)), jnp.ones((16, 32))
    per_shard = jax.shard_map(lambda x, y: x @ y, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
    assert executed_flops(jax.make_jaxpr(per_shard)(a, b).jaxpr) == 4 * (2 * 2 * 16 * 32)  # 4 shards of 2 rows


def test_flops_count_a_while_loop_by_its_trips_and_refuse_one_they_cannot_read():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 32))
    product = 2 * 8 * 16 * 32

    def loop(test, start=0, step=1):
        return lambda x, y: jax.lax.while_loop(test, lambda c: (c[0] + step, c[1] @ y @ y.T), (start, x))[1]

    def counted(f):
        return executed_flops(jax.make_jaxpr(f)(a, b).jaxpr)

    assert counted(loop(lambda c: c[0] < 5)) == 5 * 2 * product
    assert counted(loop(lambda c: c[0] <= 5, start=1)) == 5 * 2 * product
    assert counted(loop(lambda c: c[0] < 7, step=3)) == 3 * 2 * product  # 0, 3, 6
    with pytest.raises(ValueError, match="trip count is not a constant"):
        counted(loop(lambda c: jnp.sum(c[1]) < 5.0))  # runs until its values say
    no_products = jax.lax.while_loop(lambda c: jnp.sum(c) < 5.0, lambda c: c + 1.0, a)  # nothing to count
    assert executed_flops(jax.make_jaxpr(lambda x: no_products)(a).jaxpr) == 0


def test_flops_of_splash_over_several_blocks_count_the_causal_blocks_it_visits():
    """Splash traced (interpreted on CPU) over 4 blocks a side: of 16 query x key blocks, the 10 on or below the
    diagonal are computed, forward (q.k, p.v) and backward (dq: 3 products, dkv: 4)."""
    batch, heads, head_dim, blocks = 1, 2, 128, 4
    seq = blocks * kernels.SPLASH_BLOCK
    q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16)
    visited = sum(1 for i in range(blocks) for j in range(blocks) if j <= i)
    one_block_product = 2 * batch * heads * kernels.SPLASH_BLOCK**2 * head_dim
    forward = executed_flops(jax.make_jaxpr(kernels._splash_local)(q, q, q).jaxpr)
    assert forward == 2 * visited * one_block_product

    def loss(q, k, v):
        return kernels._splash_local(q, k, v).astype(jnp.float32).sum()

    both = executed_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr)
    row_sums = 2 * batch * heads * seq * head_dim  # the backward's sum(dO * O) per row, a product outside the kernels
    assert both == (2 + 3 + 4) * visited * one_block_product + row_sums


HLO = """HloModule step

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]) parameter(0)
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %ag-start = (f32[256]{0}, f32[1024]{0}) all-gather-start(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ag = f32[1024]{0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[1024]) tuple(%i, %ag)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[1024], g: bf16[64,32]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %g = bf16[64,32]{1,0} parameter(1)
  %w = (s32[], f32[1024]) while(%init), condition=%cond, body=%body
  %rs = bf16[16,32]{1,0} reduce-scatter(%g), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  %ar = f32[1024]{0} all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, to_apply=%add
  %a2a = (f32[8]{0}, bf16[8]{0}) all-to-all(%x8, %g8), replica_groups={{0,1,2,3}}
  ROOT %cp = f32[1024]{0} collective-permute(%ar), channel_id=4, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
}
"""


def test_collective_bytes_of_a_program_written_from_the_hlo_text_format():
    sent = collective_bytes(HLO)
    assert sent.pop("all-gather f32") == 6 * 4096 * 3 / 4  # in a loop of 6: a 4 KiB result, 3 of its 4 parts come in
    assert sent.pop("reduce-scatter bf16") == 16 * 32 * 2 * 3  # its bf16 [16, 32] result came from 4 such parts
    assert sent.pop("all-reduce f32") == 2 * 4096 * 3 / 4
    assert sent.pop("collective-permute f32") == 4096
    # one all-to-all of two arrays, each element type counted on its own
    assert sent == {"all-to-all f32": 8 * 4 * 3 / 4, "all-to-all bf16": 8 * 2 * 3 / 4}


def test_fsdp_minimum_gathers_in_the_products_dtype_and_reduces_gradients_in_the_parameters():
    params, chips = 7_000_000_000, 256
    fp32, bf16 = fsdp_minimum_bytes(params, chips, 1, 4, 4), fsdp_minimum_bytes(params, chips, 1, 2, 4)
    assert fp32 == 3 * 4 * params * 255 / 256  # two gathers and one reduce-scatter, all float32
    assert bf16 == (2 * 2 + 4) * params * 255 / 256  # the gathers in bfloat16: a third less in all
    # dp 4 x fsdp 64: gathers within 64 chips, then each gradient shard all-reduced over the 4 groups
    assert fsdp_minimum_bytes(params, 64, 4, 2, 4) == 8 * params * 63 / 64 + 2 * 4 * params / 64 * 3 / 4


def test_replica_groups_in_every_notation_give_their_group_size():
    assert group_size("replica_groups={{0,1,2},{3,4,5}}, dimensions={0}") == 3
    assert group_size("replica_groups=[16,16]<=[256]") == 16
    assert group_size("replica_groups=mesh['axis_0'=4,'axis_1'=64] {'axis_1'}") == 64
    assert sent_bytes("all-gather", 1024, 1) == 0
