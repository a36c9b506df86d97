"""`TrainState`, the optimizer, sharded initialisation and the jitted update step.

The step is a module-level pure function `(state, batch, rng) -> (state, metrics)` around a pluggable
`loss_fn(params, batch, rng, denominators) -> (loss, metrics)`, jitted once with explicit shardings and the state
donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from exprl_jax import losses
from exprl_jax import sharding as shd
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import init_boxed

LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]  # (params, batch, rng, denominators)


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


def _combine(key: str, total, part):
    """Micro-batch metrics are shares of the mini-batch value (losses.Denominators): summed, except maxima."""
    return jnp.maximum(total, part) if key.endswith("/max") else total + part


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: LossFn, optimizer,
               mask_key: str) -> tuple:
    """One optimizer step on a mini-batch given as micro-batches: every leaf [n, m, ...]. Gradients are accumulated
    over the n micro-batches (a scan, so activations of one micro-batch are live at a time); every loss term is
    normalised by the whole mini-batch's counts, so the update equals the unsplit one up to fp32 rounding.
    Metrics include `loss/total`, `grad/norm` and `update/norm`."""
    mask = batch[mask_key]
    denominators = losses.Denominators.of(mask.reshape(-1, *mask.shape[2:]))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro = mask.shape[0]
    if num_micro == 1:
        (loss, metrics), grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch), rng, denominators)
    else:
        def micro_step(carry, xs):
            micro, i = xs
            (loss, metrics), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, i), denominators)
            acc_grads, acc_loss, acc_metrics = carry
            acc_metrics = {k: _combine(k, acc_metrics[k], v) for k, v in metrics.items()}
            return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss, acc_metrics), None

        first = jax.tree.map(lambda x: x[0], batch)
        (_, metric_shapes), _ = jax.eval_shape(grad_fn, state.params, first, rng, denominators)
        zero_metrics = {k: jnp.full(s.shape, -jnp.inf if k.endswith("/max") else 0, s.dtype)
                        for k, s in metric_shapes.items()}
        init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), zero_metrics)
        (grads, loss, metrics), _ = jax.lax.scan(micro_step, init, (batch, jnp.arange(num_micro)))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss/total": loss, "grad/norm": optax.global_norm(grads),
               "update/norm": optax.global_norm(updates)}
    return TrainState(state.step + 1, params, opt_state), metrics


def make_train_step(loss_fn: LossFn, optimizer, shardings: TrainState, mesh: Mesh, batch_ndims: dict[str, int],
                    mask_key: str):
    """Jits `train_step` once: state in/out with its shardings (donated); the batch arrives as micro-batches
    [n, m, ...] with the m rows split over data×fsdp (batching.to_micro_batches)."""
    batch_sh = {k: shd.batch_sharding(mesh, n + 1, leading_axes=1) for k, n in batch_ndims.items()}

    def step(state, batch, rng):
        with shd.use_mesh(mesh):
            return train_step(state, batch, rng, loss_fn=loss_fn, optimizer=optimizer, mask_key=mask_key)

    return jax.jit(step, in_shardings=(shardings, batch_sh, shd.replicated(mesh)),
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
