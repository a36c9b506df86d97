"""Device mesh (`data`, `fsdp`, `tensor`) and the one rule table mapping logical axis names to mesh axes.

Parameters carry logical names from `models/transformer.py`; activations are constrained with `constrain`, which
applies inside `use_mesh(...)` and is a no-op outside it (so single-device code needs no mesh).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: FSDP shards the model width, tensor parallelism the heads / MLP / vocab.
# Activations: the batch is split over data and fsdp; heads, MLP and vocab over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scan_layers params
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_length", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; at most one entry may be -1 and is filled with the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape {shape} must have 3 entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if any(s < 1 and s != -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be >= 1 (or one -1)")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {rest}")
        shape[shape.index(-1)] = len(devices) // rest
    if any(s < 1 for s in shape) or math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_RULES) -> P:
    """PartitionSpec for logical axes. Given a shape and mesh, a dim not divisible by its mesh axes is replicated
    (e.g. 4 KV heads over tensor=8), since a sharding must divide the array evenly."""
    table = dict(rules)
    out = []
    used: set[str] = set()
    for i, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")
        mesh_axes = table.get(name) if name is not None else None
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape(init)`)."""

    def one(leaf):
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * np.ndim(leaf)
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# ---- activation constraints ----
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("exprl_active_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Within this context (at trace time), `constrain` pins activations to the mesh."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh set by the innermost `use_mesh` (at trace time), or None outside one."""
    return _ACTIVE_MESH.get()


def target_platform() -> str:
    """The platform the program being traced is compiled for: the active mesh's (a TPU topology when compiling
    ahead of time on a CPU host), else the default backend."""
    mesh = _ACTIVE_MESH.get()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    mesh = _ACTIVE_MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh)))


def batch_sharding(mesh: Mesh, ndim: int, leading_axes: int = 0) -> NamedSharding:
    """The rows dim (after `leading_axes` unsplit dims, e.g. micro-batches) over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, P(*([None] * leading_axes), ("data", "fsdp"), *([None] * (ndim - leading_axes - 1))))


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(
            f"{what} size {batch_size} is not divisible by data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']}"
            f" = {shards} on mesh {dict(mesh.shape)}; choose a multiple of {shards}"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, leading_axes: int = 0) -> dict[str, jax.Array]:
    """Places host arrays on the mesh, the rows dim split over data×fsdp, with a clear error on uneven sizes
    (batching.pad_rows pads any row count)."""
    for key, value in batch.items():
        check_batch_divisible(np.shape(value)[leading_axes], mesh, what=f"batch[{key!r}]")
    return {k: jax.device_put(v, batch_sharding(mesh, np.ndim(v), leading_axes)) for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
