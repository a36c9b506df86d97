"""`project`: the model's weight matmuls, x [M, K] times w [K, ...], with a weight gradient XLA:CPU runs fast.

Plain autodiff of `x @ w` gives the weight gradient as `dot(x, g)` contracting the M (row) dimension of both
operands. XLA:CPU cannot hand that form to YNNPACK and runs it on its slower Eigen path: on one core, the bench
train step's MLP weight gradient ([4096, 256]^T x [4096, 1024]) ran at 32 GFLOP/s, and at 51 GFLOP/s with x
transposed first, the transpose included. On CPU, `project` differentiates through a custom VJP that transposes x
into a materialised [K, M] copy (an optimisation barrier keeps XLA from folding the transpose back into the dot) and
contracts it in the standard form. The input gradient is autodiff's.

On TPU and GPU (the platform the program is compiled for, `sharding.target_platform`) `project` is the plain
matmul, so their programs, and `plan`'s memory figures, do not change.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from exprl_jax.sharding import target_platform


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


def project(x_MK, w_K_, preferred_element_type=None):
    """x [M, K] contracted with the first dimension of w [K, ...] -> [M, ...] (a 2-D x: the weight gradient of a
    3-D x is slower on XLA:CPU whatever its form)."""
    if x_MK.ndim != 2:
        raise ValueError(f"project takes a 2-D x [M, K]; got shape {x_MK.shape}")
    if target_platform() == "cpu":
        return _project_cpu(x_MK, w_K_, preferred_element_type)
    return _plain(x_MK, w_K_, preferred_element_type)
