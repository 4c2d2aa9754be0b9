"""The device mesh and the one table that says how every parameter is laid out on it.

Mesh axes: `dp` (pure data parallel: parameters replicated), `fsdp` (data parallel with parameters,
gradients and optimizer state sharded, as ZeRO-3), `tp` (tensor parallel inside a layer). The batch is
split over dp x fsdp. Kernels are (in, out): matrices that fan out (q/k/v/gate/up, embeddings, lm_head)
shard their output features over tp, the ones that fan back in (o/down) their input features, so a
layer needs one reduction over tp; the other dimension is sharded over fsdp.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from openllama.config import ConfigError

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")  # the batch is split over these; attention heads over HEADS_AXIS
HEADS_AXIS = "tp"
BATCH = P(BATCH_AXES)

# (regex over the "/"-joined parameter path, PartitionSpec); the first match wins, every param must match.
RULES: tuple[tuple[str, P], ...] = (
    # (vocab, hidden): the hidden axis over fsdp, so the table shards on any slice (32,000 rows do not
    # divide by 512 chips), the vocabulary over tp as the output layer's is
    (r"embed_tokens/embedding$", P("tp", "fsdp")),
    (r"self_attn/(q|k|v)_proj/kernel$", P("fsdp", "tp")),
    (r"self_attn/o_proj/kernel$", P("tp", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tp")),
    (r"mlp/down_proj/kernel$", P("tp", "fsdp")),
    (r"(input_layernorm|post_attention_layernorm|norm)/weight$", P()),
    (r"lm_head/kernel$", P("fsdp", "tp")),
)
# the scanned blocks' parameters held stacked (model.STACKED): the rule of the layer's own tensor, behind a
# leading layer axis that is never sharded, so each step of the scan takes one whole layer
STACKED_LAYERS = r"(^|/)layers/"


# logical activation axis -> mesh axes; the model names what an axis is, this table where it lives
ACTIVATION_AXES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES, "seq": None, "embed": None, "heads": HEADS_AXIS, "head_dim": None, "mlp": HEADS_AXIS,
    "vocab": HEADS_AXIS,
}


def constrain(x: jax.Array, *logical: str) -> jax.Array:
    """`x` laid out on the mesh in context as its logical axes say (a no-op without a mesh).

    Without these, XLA may carry the parameters' FSDP layout (hidden axis over all chips) into the
    activations and pay for it with an all-reduce per normalization and product.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = P(*(ACTIVATION_AXES[name] for name in logical))
    return jax.lax.with_sharding_constraint(x, spec)


def make_mesh(shape: tuple[int, int, int], devices: list | None = None) -> Mesh:
    """A (dp, fsdp, tp) mesh. On TPU the devices follow the slice's physical torus (neighbours on a mesh
    axis are neighbours on the interconnect); elsewhere they go in process order, so each process holds
    a contiguous slice of the batch."""
    devices = devices if devices is not None else jax.devices()
    if devices[0].platform == "tpu":
        return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), AXES)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(shape), AXES)


def path_name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def spec_for(name: str) -> P:
    for pattern, spec in RULES:
        if re.search(pattern, name):
            return P(None, *spec) if re.search(STACKED_LAYERS, name) else spec
    raise ValueError(f"parameter {name} matches no rule in openllama.train.sharding.RULES; add one")


def param_specs(params: Any) -> Any:
    """The PartitionSpec of every parameter (a tree shaped like `params`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: spec_for(path_name(path)), params)


def check_divisible(params: Any, axis_sizes: dict[str, int]) -> None:
    """Every parameter's sharded axes divide by their mesh axes, or a ConfigError naming the tensor and rule.

    Checked before anything is compiled, from shapes alone, so a plan for a slice fails with the tensor
    that breaks it rather than with an XLA error.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        spec = spec_for(name)
        for size, axes in zip(leaf.shape, spec, strict=False):
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            ways = int(np.prod([axis_sizes[a] for a in names])) if names else 1
            if size % ways:
                raise ConfigError(f"parameter {name} {tuple(leaf.shape)} cannot be laid out as {spec} on mesh "
                                  f"{axis_sizes}: its axis of {size} does not divide {ways} ways")


def one_layer(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked parameter: that of the stack without its leading layer axis."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
    return sharding


def param_shardings(params: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params))


def state_shardings(state: Any, params: Any, mesh: Mesh) -> Any:
    """Shardings of an optimizer state: any leaf shaped like a parameter is sharded like it, others replicated.

    optax states hold per-parameter trees (Adam's mu and nu) beside scalars (counts); matching by the
    parameter's path suffix keeps this independent of how the optax chain is nested.
    """
    by_path = {path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_specs(params))[0]}
    shapes = {path_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def sharding(path: tuple, leaf: Any) -> NamedSharding:
        name = path_name(path)
        for param_name, spec in by_path.items():
            if name.endswith(param_name) and getattr(leaf, "shape", None) == shapes[param_name]:
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)
