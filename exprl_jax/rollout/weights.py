"""The weights the rollout engine samples with: a copy of the policy in `rollout.dtype`, unrolled layers, laid out
for decoding, refreshed from the training params before each sampling call.

Decoding reads every weight once per token, so FSDP-sharded weights would be all-gathered at every step (XLA
hoists that out of the loop and keeps a full copy per chip). The rollout copy is instead split over `tensor` only
and whole on each data×fsdp group: the chips that hold a slot's cache rows hold the weights they need.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh

from exprl_jax import sharding as shd
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import decode_layout, init_boxed

# the training rules with the model width unsplit: tensor parallelism only
ROLLOUT_RULES = tuple((name, None if name == "embed" else axes) for name, axes in shd.LOGICAL_RULES)


def rollout_model_config(config: ModelConfig, dtype: str = "") -> ModelConfig:
    """The model config the engine decodes with: `dtype` ("" = the compute dtype) for weights and compute."""
    dtype = dtype or config.dtype
    return config.replace(scan_layers=False, remat="none", dtype=dtype, param_dtype=dtype)


def rollout_shardings(rollout_config: ModelConfig, mesh: Mesh):
    boxed = jax.eval_shape(lambda r: init_boxed(rollout_config, r), jax.random.key(0))
    return shd.param_shardings(boxed, mesh, rules=ROLLOUT_RULES)


_transposed = jax.jit(lambda x: x.T)  # a program's output is materialised in its own layout


def untied_head(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """(config with `tie_embeddings` off, params with an `lm_head` that is a [D, V] copy of the transposed
    embedding): the same logits. XLA:CPU's dot emitter runs x [M, D] times a transposed [V, D] embedding at a
    fraction of the speed of a [D, V] matrix (Qwen3-0.6B's head, M = 8, one core, in a loop: 4.0 s against 0.13 s per
    product), and folds a transpose taken inside the program into the dot, so the copy is made by its own program.
    Costs one extra copy of the embedding while sampling."""
    if not config.tie_embeddings:
        return config, params
    return config.replace(tie_embeddings=False), {**params, "lm_head": _transposed(params["embed"])}


def make_rollout_params(config: ModelConfig, rollout_config: ModelConfig, mesh: Mesh | None):
    """A jitted `params -> rollout params` (cast, layers unstacked, resharded); without a mesh just cast."""
    dtype = rollout_config.jnp_param_dtype

    def convert(params):
        _, params = decode_layout(config, params)
        return jax.tree.map(lambda x: x.astype(dtype), params)

    if mesh is None:
        return jax.jit(convert)
    return jax.jit(convert, out_shardings=rollout_shardings(rollout_config, mesh))
