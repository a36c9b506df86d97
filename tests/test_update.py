"""The jitted update: gradient accumulation over micro-batches equals the unsplit update for every loss, padded
rows on any mesh change nothing, all-masked mini-batches take no step, and masters stay float32."""
import types

import jax
import numpy as np
import optax
import pytest

from conftest import random_params, smoke_config
from exprl_jax import config as config_lib
from exprl_jax import sharding as shd
from exprl_jax.batching import to_micro_batches
from exprl_jax.losses import AGGREGATIONS
from exprl_jax.methods import batch_ndims, loss_mask_key, make_loss_fn
from exprl_jax.models.config import ModelConfig
from exprl_jax.steps import StepRunner
from exprl_jax.train_state import init_train_state, make_train_step

CFG = ModelConfig.tiny()
P, R = 4, 9  # prompt and response tokens


def _rl_batch(rows=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, P + R)).astype(np.int32)
    attention = np.ones_like(tokens)
    attention[0, :2] = 0
    lengths = rng.integers(1, R + 1, rows)
    lengths[3] = 0  # an unscored / dropped row: no loss tokens at all
    response_mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    attention[:, P:] = response_mask.astype(np.int32)
    return {
        "tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
        # behaviour log-probs far from the current policy's, so ratios leave the clip range in both directions
        "old_logprobs": (rng.normal(-5.5, 1.0, (rows, R)) * response_mask).astype(np.float32),
        "advantages": (rng.normal(0, 1, (rows, 1)) * response_mask).astype(np.float32),
        "ref_logprobs": (rng.normal(-5.5, 0.5, (rows, R)) * response_mask).astype(np.float32),
        "teacher_logprobs": (rng.normal(-5.0, 0.5, (rows, R)) * response_mask).astype(np.float32),
        "loss_mask": np.concatenate([np.zeros((rows, P - 1), np.float32), response_mask], axis=1),
    }


def _update(method, agg, batch, *, micro_batch_size, mesh):
    """One SGD(1) step (params delta = -gradient, so a mis-weighted micro-batch shows) -> (params, metrics)."""
    cfg = config_lib.resolve(smoke_config(**{"method": method, "loss.agg": agg, "loss.entropy_coef": 1e-2}))
    optimizer = optax.sgd(1.0)
    state, shardings = init_train_state(CFG, optimizer, jax.random.key(0), mesh, params=random_params(CFG, std=0.1))
    ndims = batch_ndims(method)
    step = make_train_step(make_loss_fn(method, CFG, cfg.loss, 0.8), optimizer, shardings, mesh, ndims,
                           loss_mask_key(method))
    micro = to_micro_batches({k: batch[k] for k in ndims}, micro_batch_size, mesh.shape["data"] * mesh.shape["fsdp"])
    state, metrics = step(state, shd.shard_batch(micro, mesh, leading_axes=1), jax.random.key(1))
    return jax.device_get(state.params), jax.device_get(metrics), next(iter(micro.values())).shape[0]


def _assert_same(got, want):
    params, metrics, _ = got
    ref_params, ref_metrics, _ = want
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(ref_metrics)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _single_device():
    return shd.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batches_equal_the_unsplit_update_for_every_aggregation(agg):
    batch = _rl_batch()
    mesh = _single_device()
    whole = _update("grpo", agg, batch, micro_batch_size=0, mesh=mesh)
    split = _update("grpo", agg, batch, micro_batch_size=2, mesh=mesh)
    assert whole[2] == 1 and split[2] == 3
    _assert_same(split, whole)
    assert split[1]["ratio/max"] > 1.3  # far off-policy: the clip and dual clip are both exercised


@pytest.mark.parametrize("method", ["sft", "self_distill"])
def test_micro_batches_equal_the_unsplit_update_for_sft_and_self_distillation(method):
    batch = _rl_batch()
    mesh = _single_device()
    _assert_same(_update(method, "token-mean", batch, micro_batch_size=4, mesh=mesh),  # 6 rows -> 4 + 2 padded
                 _update(method, "token-mean", batch, micro_batch_size=0, mesh=mesh))


@pytest.mark.parametrize("shape,micro", [((8, 1, 1), 0), ((2, 2, 2), 3), ((1, 4, 2), 5)])
def test_awkward_row_counts_are_padded_on_the_8_device_mesh(shape, micro):
    # 6 rows on 8 or 4 batch shards: zero rows are appended, and the update is the single-device one
    batch = _rl_batch()
    want = _update("grpo", "seq-mean-token-mean", batch, micro_batch_size=0, mesh=_single_device())
    got = _update("grpo", "seq-mean-token-mean", batch, micro_batch_size=micro, mesh=shd.make_mesh(shape))
    _assert_same(got, want)


def test_update_skips_empty_minibatches_and_reports_the_worst_ratio():
    cfg = config_lib.resolve(smoke_config(**{"method": "grpo", "loss.ppo_mini_batch_size": 4}))
    mesh = _single_device()
    optimizer = optax.sgd(1e-3)
    state, shardings = init_train_state(CFG, optimizer, jax.random.key(0), mesh, params=random_params(CFG))
    update_fn = make_train_step(make_loss_fn("grpo", CFG, cfg.loss, 0.8), optimizer, shardings, mesh,
                                batch_ndims("grpo"), "response_mask")
    batch = {k: v for k, v in _rl_batch(rows=12).items() if k in batch_ndims("grpo")}
    for key in ("response_mask", "old_logprobs", "advantages", "ref_logprobs"):
        batch[key][4:8] = 0.0  # the second of three mini-batches has no loss token
    runner = types.SimpleNamespace(cfg=cfg, exp=types.SimpleNamespace(mesh=mesh), update_fn=update_fn)
    state, metrics = StepRunner.update(runner, state, batch, jax.random.key(3))
    assert int(state.step) == 2 and metrics["update/minibatches"] == 2
    assert metrics["update/skipped_minibatches"] == 1
    per_minibatch = [StepRunner.update(runner, init_train_state(CFG, optimizer, jax.random.key(0), mesh,
                                                                params=random_params(CFG))[0],
                                       {k: v[i:i + 4] for k, v in batch.items()}, jax.random.key(3))[1]
                     for i in (0, 8)]
    assert metrics["ratio/max"] == max(m["ratio/max"] for m in per_minibatch)
    assert metrics["ratio/max"] > min(m["ratio/max"] for m in per_minibatch)


def test_a_bf16_checkpoint_gives_float32_masters_and_optimizer_state(tmp_path):
    from exprl_jax.build import build_model
    from exprl_jax.models.hf import save_hf
    from exprl_jax.tokenizer import char_tokenizer
    from exprl_jax.train_state import make_optimizer

    bf16 = CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype("bfloat16"), random_params(CFG))
    save_hf(str(tmp_path), bf16, params)
    char_tokenizer().save_pretrained(str(tmp_path))
    cfg = smoke_config(**{"model.hf_path": str(tmp_path), "model.dtype": "bfloat16"})
    model_cfg, loaded, _ = build_model(cfg)
    assert model_cfg.param_dtype == "float32" and model_cfg.dtype == "bfloat16"
    state, _ = init_train_state(model_cfg, make_optimizer(cfg.optim), jax.random.key(0), _single_device(),
                                params=loaded)
    assert {x.dtype.name for x in jax.tree.leaves(state.params)} == {"float32"}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and {x.dtype.name for x in moments} == {"float32"}


def test_recomputed_behaviour_logprobs_make_the_first_bf16_ratio_exactly_one(tmp_path):
    # In bf16 the sampler's log-probs differ from the trainer's (here by ~6e-4 nats on the tiny model; up to 0.2 at
    # 4B): without recomputation the on-policy mini-batch already has ratios != 1 and a nonzero KL to "old".
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    rows = {}
    for recompute in ("auto", "false"):
        cfg = smoke_config(**{"method": "grpo", "train.steps": 1, "eval.at_start": False, "eval.at_end": False,
                              "model.dtype": "bfloat16", "loss.ppo_mini_batch_size": 0,
                              "rollout.recompute_logprobs": recompute})
        Experiment(cfg, str(tmp_path / recompute)).run()
        rows[recompute] = read_metrics(str(tmp_path / recompute / "metrics.jsonl"))[-1]
    assert rows["auto"]["ratio/max"] == 1.0 and rows["auto"]["ratio/mean"] == 1.0
    assert rows["auto"]["kl/approx_old"] == 0.0
    assert rows["auto"]["rollout/logprob_gap_max"] > 0.0
    assert "rollout/logprob_gap_max" not in rows["false"]
    assert rows["false"]["ratio/max"] > 1.0
