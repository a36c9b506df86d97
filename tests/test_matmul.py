"""`models.matmul.project`: the same values and gradients as x @ w, a weight gradient in the form XLA:CPU hands to
YNNPACK, the plain matmul when compiling for a TPU, and small weights with 2 KiB rows padded inside
`padded_small_weights` (the CPU decode program)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exprl_jax import sharding as shd
from exprl_jax.models import matmul
from exprl_jax.models.matmul import padded_small_weights, project


def _loss(matmul):
    # a non-linear loss, so that the upstream gradient is not a constant
    return lambda x, w: jnp.sum(jnp.sin(matmul(x, w)) * jnp.arange(1.0, 1.0 + np.prod(w.shape[1:])).reshape(
        w.shape[1:]))


@pytest.mark.parametrize("w_shape", [(6, 5), (6, 2, 3)])
def test_project_values_and_gradients_match_numpy(w_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6)).astype(np.float32)
    w = (0.3 * rng.normal(size=w_shape)).astype(np.float32)
    w2 = w.reshape(6, -1)
    out, (dx, dw) = jax.jit(jax.value_and_grad(_loss(project), argnums=(0, 1)))(x, w)
    # numpy: y = x w2; L = sum(sin(y) * c); dL/dy = cos(y) * c; dx = g w2^T; dw = x^T g
    c = np.arange(1.0, 1.0 + w2.shape[1])
    y = x.astype(np.float64) @ w2
    g = np.cos(y) * c
    np.testing.assert_allclose(out, np.sum(np.sin(y) * c), rtol=1e-5)
    np.testing.assert_allclose(dx, g @ w2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, (x.T @ g).reshape(w_shape), rtol=1e-5, atol=1e-5)


def test_project_keeps_input_dtypes_and_the_preferred_output_type():
    x = jnp.ones((4, 3), jnp.bfloat16)
    w = jnp.full((3, 2), 0.5, jnp.bfloat16)
    loss = lambda x, w: jnp.sum(project(x, w, preferred_element_type=jnp.float32) ** 2)  # noqa: E731
    assert project(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    # y = 1.5 everywhere: dL/dy = 3; dx = 3 * sum_n w = 3; dw = 3 * sum_m x = 12
    np.testing.assert_array_equal(np.asarray(dx, np.float32), 3.0)
    np.testing.assert_array_equal(np.asarray(dw, np.float32), 12.0)


def test_project_rejects_a_3d_x():
    with pytest.raises(ValueError, match=r"2-D x \[M, K\]; got shape \(2, 3, 4\)"):
        project(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))


def _row_contracting_dots(compiled_text: str) -> list[str]:
    """Dots whose lhs contracts its major dimension (`x^T g` left to the dot): XLA:CPU runs them on Eigen."""
    return [line for line in compiled_text.splitlines()
            if re.search(r"\bdot\(", line) and "lhs_contracting_dims={0}" in line]


def test_on_cpu_the_weight_gradient_contracts_a_materialised_transpose():
    x = jnp.ones((256, 64))
    w = jnp.ones((64, 128))
    plain = jax.jit(jax.grad(_loss(lambda x, w: x @ w), argnums=1)).lower(x, w).compile().as_text()
    ours = jax.jit(jax.grad(_loss(project), argnums=1)).lower(x, w).compile().as_text()
    assert _row_contracting_dots(plain), "plain autodiff no longer gives the row-contracting form: recheck project"
    assert not _row_contracting_dots(ours)


def test_compiled_for_tpu_project_is_the_plain_matmul():
    from exprl_jax import plan

    mesh = shd.make_mesh((1, 1, 1), plan.topology_devices("v5p-32")[:1])
    x = jnp.ones((256, 64))
    w = jnp.ones((64, 128))
    with shd.use_mesh(mesh):
        assert shd.target_platform() == "tpu"
        tpu_text = jax.jit(jax.grad(_loss(project), argnums=1)).lower(x, w).as_text()
    cpu_text = jax.jit(jax.grad(_loss(project), argnums=1)).lower(x, w).as_text()
    assert "optimization_barrier" in cpu_text
    assert "optimization_barrier" not in tpu_text


def _pads_in(fn, *args) -> bool:
    # a fresh function each time: jit caches traces by function, and the context is read while tracing
    return "stablehlo.pad" in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


@pytest.mark.parametrize("w_shape", [(24, 512), (24, 2, 256), (24, 1024)])
def test_inside_padded_small_weights_2k_rows_are_padded_and_the_values_unchanged(w_shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 24)).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    assert not _pads_in(project, x, w)
    with padded_small_weights():
        assert _pads_in(project, x, w)
        out = jax.jit(lambda x, w: project(x, w))(x, w)
    assert out.shape == (5,) + w_shape[1:]
    np.testing.assert_allclose(out, (x.astype(np.float64) @ w.reshape(24, -1)).reshape(out.shape), rtol=1e-5,
                               atol=1e-5)


def test_padded_small_weights_leaves_other_rows_large_weights_and_meshes_alone():
    x = jnp.ones((4, 24))
    big_rows = matmul.PAD_MAX_WEIGHT_BYTES // 2048 + 1  # 2 KiB rows, one row over the size limit
    with padded_small_weights():
        assert not _pads_in(project, x, jnp.ones((24, 500)))  # 2,000-byte rows
        assert not _pads_in(project, x, jnp.ones((24, 256)))  # 1 KiB rows
        assert not _pads_in(project, x.astype(jnp.bfloat16), jnp.ones((24, 1024), jnp.bfloat16))  # measured in f32
        assert not _pads_in(project, jnp.ones((4, big_rows)), jnp.ones((big_rows, 512)))
        assert _pads_in(project, jnp.ones((4, big_rows - 1)), jnp.ones((big_rows - 1, 512)))
        mesh = shd.make_mesh((2, 1, 1), jax.devices()[:2])
        with shd.use_mesh(mesh):  # a split weight would be resharded to pad it
            assert not _pads_in(project, x, jnp.ones((24, 512)))
