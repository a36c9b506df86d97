"""Memory layouts that must not change the math: scan over layers (stacked params) and rematerialisation."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import random_params
from exprl_jax.models.config import REMAT_POLICIES, ModelConfig
from exprl_jax.models.hf import load_hf, save_hf
from exprl_jax.models.transformer import forward, stack_layers, token_logprobs, unstack_layers
from exprl_jax.sharding import make_mesh, param_shardings
from exprl_jax.models.transformer import init_boxed
from test_hf import _batch, _hf_logits, _max_error_at_real_tokens, _random_hf_model

CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    model = _random_hf_model("qwen3")
    path = str(tmp_path_factory.mktemp("qwen3_scan"))
    model.save_pretrained(path)
    tokens, mask = _batch()
    return dict(path=path, tokens=tokens, mask=mask, logits=_hf_logits(model, tokens, mask))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_match_transformers(qwen3_checkpoint, remat):
    config, params = load_hf(qwen3_checkpoint["path"], scan_layers=True, remat=remat)
    assert config.scan_layers and config.remat == remat
    assert "layers_0" not in params
    assert params["layers"]["attn"]["q_proj"].shape == (config.num_layers, config.d_model, config.num_heads,
                                                        config.head_dim)
    ours = np.asarray(jax.jit(lambda p, t, m: forward(config, p, t, attention_mask=m))(
        params, qwen3_checkpoint["tokens"], qwen3_checkpoint["mask"]))
    assert _max_error_at_real_tokens(ours, qwen3_checkpoint["logits"], qwen3_checkpoint["mask"]) < 1e-4


def test_scanned_params_save_and_load_in_either_layout(qwen3_checkpoint, tmp_path):
    config, scanned = load_hf(qwen3_checkpoint["path"], scan_layers=True)
    save_hf(str(tmp_path), config, scanned)
    flat_config, flat = load_hf(str(tmp_path))
    _, reference = load_hf(qwen3_checkpoint["path"])
    assert not flat_config.scan_layers
    for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(stack_layers(flat, config.num_layers)), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_hf_refuses_an_unknown_override(qwen3_checkpoint):
    with pytest.raises(TypeError, match="scan_layer"):
        load_hf(qwen3_checkpoint["path"], scan_layer=True)


def test_stack_unstack_round_trip():
    params = random_params(CFG)
    again = unstack_layers(stack_layers(params, CFG.num_layers), CFG.num_layers)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _grads(config, params, tokens, mask):
    return jax.jit(jax.grad(lambda p: token_logprobs(config, p, tokens, attention_mask=mask).sum()))(params)


@pytest.mark.parametrize("scan", [False, True])
def test_every_remat_policy_gives_the_same_gradients(scan):
    params = random_params(CFG, std=0.1)
    tokens, mask = _batch()
    if scan:
        params = stack_layers(params, CFG.num_layers)
    reference = _grads(CFG.replace(scan_layers=scan), params, tokens, mask)
    for policy in REMAT_POLICIES[1:]:
        got = _grads(CFG.replace(scan_layers=scan, remat=policy), params, tokens, mask)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=policy)


def test_scanned_params_shard_on_a_mesh_like_unrolled_ones():
    mesh = make_mesh((2, 2, 2))
    config = CFG.replace(scan_layers=True)
    boxed = jax.eval_shape(lambda r: init_boxed(config, r), jax.random.key(0))
    specs = param_shardings(boxed, mesh)
    # the stacked axis stays whole; the rest follows LOGICAL_RULES as in the unrolled layout (embed over fsdp,
    # heads over tensor)
    assert specs["layers"]["attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
    params = stack_layers(random_params(CFG), CFG.num_layers)
    tokens, mask = _batch()
    single = np.asarray(jax.jit(lambda p: forward(config, p, tokens, attention_mask=mask))(params))
    sharded = jax.device_put(params, specs)
    meshed = np.asarray(jax.jit(lambda p: forward(config, p, tokens, attention_mask=mask))(sharded))
    np.testing.assert_allclose(meshed, single, atol=1e-5, rtol=0)
