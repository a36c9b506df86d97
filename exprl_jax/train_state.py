"""`TrainState`, the optimizer, sharded initialisation and the jitted update step.

The step is a module-level pure function `(state, batch, rng) -> (state, metrics)` around a pluggable
`loss_fn(params, batch, rng) -> (loss, metrics)`, jitted once with explicit shardings and the state donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from exprl_jax import sharding as shd
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import init_boxed

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    learning_rate: float = 1e-6  # SPEC §5: constant, no warm-up
    warmup_steps: int = 0
    decay_steps: int = 0  # > 0: cosine decay to `final_lr_frac` of the peak over this many steps
    final_lr_frac: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # applied to every parameter, like torch AdamW in the reference implementation
    grad_clip_norm: float = 1.0


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.decay_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, cfg.decay_steps, cfg.learning_rate * cfg.final_lr_frac)
    elif cfg.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    else:
        schedule = optax.constant_schedule(cfg.learning_rate)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh):
    """NamedShardings for every leaf of TrainState: optimizer moments follow their parameter, the rest replicate."""
    boxed = jax.eval_shape(lambda r: init_boxed(model_cfg, r), jax.random.PRNGKey(0))
    params_sh = shd.param_shardings(boxed, mesh)
    opt_shape = jax.eval_shape(optimizer.init, nn.unbox(boxed))
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_shape, params_sh,
        transform_non_params=lambda _: shd.replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=shd.replicated(mesh), params=params_sh, opt_state=opt_sh)


def init_train_state(model_cfg: ModelConfig, optimizer, rng: jax.Array, mesh: Mesh, params=None):
    """Builds the state already sharded (eval_shape -> shardings -> jit with out_shardings).
    Given `params` (e.g. from `load_hf`), they are placed on the mesh instead of initialised."""
    shardings = state_shardings(model_cfg, optimizer, mesh)

    def init(r):
        p = nn.unbox(init_boxed(model_cfg, r)) if params is None else params
        return TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))

    if params is None:
        return jax.jit(init, out_shardings=shardings)(rng), shardings
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state), shardings


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: LossFn, optimizer) -> tuple:
    """One optimizer step. Metrics include `loss/total`, `grad/norm` and `update/lr_step`."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss/total": loss, "grad/norm": optax.global_norm(grads),
               "update/norm": optax.global_norm(updates)}
    return TrainState(state.step + 1, params, opt_state), metrics


def make_train_step(loss_fn: LossFn, optimizer, shardings: TrainState, mesh: Mesh, batch_ndims: dict[str, int]):
    """Jits `train_step` once: state in/out with its shardings (donated), batch split over data×fsdp."""
    batch_sh = {k: shd.batch_sharding(mesh, n) for k, n in batch_ndims.items()}

    def step(state, batch, rng):
        with shd.use_mesh(mesh):
            return train_step(state, batch, rng, loss_fn=loss_fn, optimizer=optimizer)

    return jax.jit(step, in_shardings=(shardings, batch_sh, shd.replicated(mesh)),
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
