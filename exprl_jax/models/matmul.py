"""`project`: the model's weight matmuls, x [M, K] times w [K, ...], with a weight gradient XLA:CPU runs fast.

Plain autodiff of `x @ w` gives the weight gradient as `dot(x, g)` contracting the M (row) dimension of both
operands. XLA:CPU cannot hand that form to YNNPACK and runs it on its slower Eigen path: on one core, the bench
train step's MLP weight gradient ([4096, 256]^T x [4096, 1024]) ran at 32 GFLOP/s, and at 51 GFLOP/s with x
transposed first, the transpose included. On CPU, `project` differentiates through a custom VJP that transposes x
into a materialised [K, M] copy (an optimisation barrier keeps XLA from folding the transpose back into the dot) and
contracts it in the standard form. The input gradient is autodiff's.

Inside `padded_small_weights()` (the CPU decode program, one device), an f32 weight of at most
`PAD_MAX_WEIGHT_BYTES` whose rows are a multiple of 2 KiB long is multiplied with `PAD_COLUMNS` zero columns
appended (the pad of a loop-invariant weight is hoisted out of the decode loop) and the extra outputs dropped. XLA's
own dot emitter, which the decode program uses, runs such shapes at about half speed (cache-set conflicts of rows
whose stride is a multiple of 2 KiB, presumably): one core, in a 200-dot loop,
[32, 256] x [256, 1024] 0.49 ms -> 0.29 ms, [32, 256] x [256, 512] 0.15 -> 0.11, [8, 1024] x [1024, 1024] 0.56 ->
0.23. Larger weights are memory-bound and gained nothing ([8, 1024] x [1024, 3072] 3.3 vs 3.0 ms, [8, 3072] x
[3072, 1024] 2.4 vs 2.7). The engine on the bench model (gate, up and the LM head padded), 32 rows x 128 new tokens,
one core, two alternated rounds: 2,143-2,153 -> 2,422-2,705 new tokens/s, the same tokens.

On TPU and GPU (the platform the program is compiled for, `sharding.target_platform`) `project` is the plain
matmul, so their programs, and `plan`'s memory figures, do not change.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from functools import partial

import jax
import jax.numpy as jnp

from exprl_jax.sharding import active_mesh, target_platform

PAD_COLUMNS = 16  # zero columns appended: 64 bytes of f32, one cache line
PAD_ROW_MULTIPLE_BYTES = 2048
PAD_MAX_WEIGHT_BYTES = 4 << 20
_PAD_SMALL_WEIGHTS = contextvars.ContextVar("pad_small_weights", default=False)


@contextlib.contextmanager
def padded_small_weights():
    """While tracing inside this context, CPU projections pad small weights with 2 KiB-multiple rows (above). Enter
    it inside the function being traced: jit caches a trace by function, not by this context."""
    token = _PAD_SMALL_WEIGHTS.set(True)
    try:
        yield
    finally:
        _PAD_SMALL_WEIGHTS.reset(token)


def _pads(w_K_) -> bool:
    if not _PAD_SMALL_WEIGHTS.get() or w_K_.ndim < 2 or w_K_.dtype != jnp.float32:  # measured in f32 only
        return False
    mesh = active_mesh()
    row_bytes = math.prod(w_K_.shape[1:]) * w_K_.dtype.itemsize
    return ((mesh is None or mesh.size == 1) and row_bytes % PAD_ROW_MULTIPLE_BYTES == 0
            and w_K_.shape[0] * row_bytes <= PAD_MAX_WEIGHT_BYTES)


def _plain(x_MK, w_K_, preferred_element_type):
    return jnp.tensordot(x_MK, w_K_, axes=1, preferred_element_type=preferred_element_type)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project_cpu(x_MK, w_K_, preferred_element_type):
    return _plain(x_MK, w_K_, preferred_element_type)


def _project_cpu_fwd(x_MK, w_K_, preferred_element_type):
    return _plain(x_MK, w_K_, preferred_element_type), (x_MK, w_K_)


def _project_cpu_bwd(preferred_element_type, residuals, g_M_):
    x_MK, w_K_ = residuals
    (dx_MK,) = jax.vjp(lambda x: _plain(x, w_K_, preferred_element_type), x_MK)[1](g_M_)
    # x as a materialised [K, M] array: the weight gradient's dot then contracts the lhs's minor dimension
    x_KM = jax.lax.optimization_barrier(x_MK.T)
    (dw_K_,) = jax.vjp(lambda w: _plain(x_KM.T, w, preferred_element_type), w_K_)[1](g_M_)
    return dx_MK, dw_K_


_project_cpu.defvjp(_project_cpu_fwd, _project_cpu_bwd)


def _padded(x_MK, w_K_, preferred_element_type):
    K, rest = w_K_.shape[0], w_K_.shape[1:]
    n = math.prod(rest)
    w_KN = jnp.pad(w_K_.reshape(K, n), ((0, 0), (0, PAD_COLUMNS)))
    y_MN = _plain(x_MK, w_KN, preferred_element_type)[:, :n]
    return y_MN.reshape(x_MK.shape[0], *rest)


def project(x_MK, w_K_, preferred_element_type=None):
    """x [M, K] contracted with the first dimension of w [K, ...] -> [M, ...] (a 2-D x: the weight gradient of a
    3-D x is slower on XLA:CPU whatever its form)."""
    if x_MK.ndim != 2:
        raise ValueError(f"project takes a 2-D x [M, K]; got shape {x_MK.shape}")
    if target_platform() == "cpu":
        if _pads(w_K_):
            return _padded(x_MK, w_K_, preferred_element_type)
        return _project_cpu(x_MK, w_K_, preferred_element_type)
    return _plain(x_MK, w_K_, preferred_element_type)
