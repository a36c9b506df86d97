"""Hand-derived checks of the loss math (SPEC §5, §6). Each expected number is worked out in a comment."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exprl_jax import losses

# The losses run under jit in training; jitting here also compiles each case once instead of once per primitive,
# which keeps this file fast. ValueError checks call the plain functions.
policy_loss = jax.jit(losses.policy_loss, static_argnames=("clip_low", "clip_high", "dual_clip", "agg"))
aggregate = jax.jit(losses.aggregate, static_argnames="agg")
kl_penalty = jax.jit(losses.kl_penalty, static_argnames="kind")
entropy_from_logits = jax.jit(losses.entropy_from_logits)
sft_loss = jax.jit(losses.sft_loss, static_argnames="agg")
self_distill_loss = jax.jit(losses.self_distill_loss, static_argnames="agg")

OLD = -1.0  # old log-prob used throughout; ratios are set by logprobs = OLD + log(ratio)


def _policy_inputs(ratios, advantages, mask=None):
    ratios = np.asarray(ratios, np.float32).reshape(1, -1)
    old = np.full_like(ratios, OLD)
    new = old + np.log(ratios)
    adv = np.asarray(advantages, np.float32).reshape(1, -1)
    mask = np.ones_like(ratios) if mask is None else np.asarray(mask, np.float32).reshape(1, -1)
    return jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask)


def _loss(ratios, advantages, mask=None, **kwargs):
    return float(policy_loss(*_policy_inputs(ratios, advantages, mask), **kwargs)[0])


# ---------------------------------------------------------------- policy_loss branches, one token each
@pytest.mark.parametrize(
    "ratio, advantage, expected",
    [
        # Inside [0.8, 1.28]: loss = -A·r = -1.1 (and +0.9·2 = 1.8 for A = -2).
        (1.1, 1.0, -1.1),
        (0.9, -2.0, 1.8),
        # Clip low active (A<0, r<0.8): max(-A·r, -A·0.8) = max(0.5, 0.8) = 0.8. A min() bug gives 0.5.
        (0.5, -1.0, 0.8),
        # r<0.8 but A>0: the clip does not bind; max(-0.5, -0.8) = -0.5 (unclipped, pessimistic side).
        (0.5, 1.0, -0.5),
        # Clip high active (A>0, r>1.28): max(-1.5, -1.28) = -1.28. A symmetric 0.2 clip gives -1.2.
        (1.5, 1.0, -1.28),
        # r = 1.25 is inside the asymmetric range: -1.25. A symmetric clip would clip it to -1.2.
        (1.25, 1.0, -1.25),
        # A<0, r=2: max(2, 1.28) = 2 < dual cap 3·1 → 2 (dual cap inactive).
        (2.0, -1.0, 2.0),
        # Dual clip active: A<0, r=5: max(5, 1.28) = 5, capped at -A·3 = 3.
        (5.0, -1.0, 3.0),
        # A>0, r=5: -1.28 from the high clip; the dual cap never applies to positive advantages.
        (5.0, 1.0, -1.28),
    ],
)
def test_policy_loss_single_token_branches(ratio, advantage, expected):
    assert _loss([ratio], [advantage]) == pytest.approx(expected, abs=1e-5)


def test_dual_clip_none_leaves_negative_advantage_uncapped():
    # A=-1, r=5: without the cap the loss is max(5, 1.28) = 5; with c=3 it is 3.
    assert _loss([5.0], [-1.0], dual_clip=None) == pytest.approx(5.0, abs=1e-5)
    assert _loss([5.0], [-1.0], dual_clip=3.0) == pytest.approx(3.0, abs=1e-5)
    metrics = policy_loss(*_policy_inputs([5.0], [-1.0]), dual_clip=None)[1]
    assert float(metrics["clip/frac_dual"]) == 0.0


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        losses.policy_loss(*_policy_inputs([1.0], [1.0]), dual_clip=0.9)


def test_custom_clip_range():
    # clip_high=0.1: A=1, r=1.25 → max(-1.25, -1.1) = -1.1 (vs -1.25 at the default 0.28).
    assert _loss([1.25], [1.0], clip_high=0.1) == pytest.approx(-1.1, abs=1e-5)
    # clip_low=0.4: A=-1, r=0.5 → max(0.5, 0.6) = 0.6 (vs 0.8 at the default 0.2).
    assert _loss([0.5], [-1.0], clip_low=0.4) == pytest.approx(0.6, abs=1e-5)


# ---------------------------------------------------------------- all branches together, with a masked token
# token:      t1    t2    t3    t4    t5    t6    t7 (masked)
MIXED_RATIOS = [1.1, 0.5, 1.5, 5.0, 0.5, 1.5, 10.0]
MIXED_ADV = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0]
MIXED_MASK = [1, 1, 1, 1, 1, 1, 0]


def test_mixed_example_loss_and_clip_fractions():
    loss, metrics = policy_loss(*_policy_inputs(MIXED_RATIOS, MIXED_ADV, MIXED_MASK))
    # Per-token: t1 -1.1 (none), t2 0.8 (low), t3 -1.28 (high), t4 3.0 (dual), t5 -0.5 (none, A>0 below range),
    # t6 max(1.5, 1.28) = 1.5 (none: A<0 above range, under the cap). Sum = 2.42 over 6 tokens → 0.403333.
    # If the masked t7 (capped at 3.0) leaked in: (2.42 + 3) / 7 = 0.774286.
    assert float(loss) == pytest.approx(2.42 / 6, abs=1e-5)
    assert float(metrics["loss/policy"]) == pytest.approx(2.42 / 6, abs=1e-5)
    # One token in each clip category out of 6 valid; t7 would add a dual (and a 7th token) if not masked.
    assert float(metrics["clip/frac_low"]) == pytest.approx(1 / 6, abs=1e-6)
    assert float(metrics["clip/frac_high"]) == pytest.approx(1 / 6, abs=1e-6)
    assert float(metrics["clip/frac_dual"]) == pytest.approx(1 / 6, abs=1e-6)
    # mean ratio = (1.1 + 0.5 + 1.5 + 5 + 0.5 + 1.5) / 6 = 10.1 / 6; max = 5 (10 is masked).
    assert float(metrics["ratio/mean"]) == pytest.approx(10.1 / 6, rel=1e-5)
    assert float(metrics["ratio/max"]) == pytest.approx(5.0, rel=1e-5)
    # k3 of KL(old‖new): r − log r − 1 per token; e.g. r=5 → 5 − 1.609438 − 1 = 2.390562, r=1.1 → 0.004690.
    r = np.array(MIXED_RATIOS[:6])
    assert float(metrics["kl/approx_old"]) == pytest.approx(np.mean(r - np.log(r) - 1), rel=1e-5)
    assert set(metrics) == {"loss/policy", "clip/frac_low", "clip/frac_high", "clip/frac_dual",
                            "ratio/mean", "ratio/max", "kl/approx_old"}


def test_masked_tokens_cannot_leak_nan_or_inf():
    new, old, adv, mask = _policy_inputs([1.1, 1.0], [1.0, -1.0], [1, 0])
    # Garbage in the padded slot: NaN log-prob, inf advantage. Only t1 counts: loss = -1.1.
    new, adv = np.array(new), np.array(adv)
    new[0, 1], adv[0, 1] = np.nan, np.inf
    loss_fn = lambda lp: policy_loss(lp, old, adv, mask)[0]
    assert float(loss_fn(new)) == pytest.approx(-1.1, abs=1e-5)
    grad = np.asarray(jax.jit(jax.grad(loss_fn))(new))
    # d/dlp (-A·exp(lp - old)) = -A·r = -1.1 on t1; exactly 0 on the masked slot.
    np.testing.assert_allclose(grad, [[-1.1, 0.0]], atol=1e-5)


def test_zero_advantage_tokens_are_never_clipped():
    # A = 0: loss 0 on every branch, and no clip is "active" however far the ratio moved (counting A ≤ 0 as
    # negative would report 1/3 low and 1/3 dual here).
    loss, metrics = policy_loss(*_policy_inputs([0.5, 1.5, 5.0], [0.0, 0.0, 0.0]))
    assert float(loss) == 0.0
    assert [float(metrics[k]) for k in ("clip/frac_low", "clip/frac_high", "clip/frac_dual")] == [0.0, 0.0, 0.0]


def test_ratio_max_ignores_masked_tokens():
    # Valid ratios 0.5 and 0.9, masked 10: ratio/max = 0.9. Counting the masked slot would give 10 (its raw
    # ratio) or 1 (its ratio after the padding is zeroed), both above every valid token.
    metrics = policy_loss(*_policy_inputs([0.5, 0.9, 10.0], [1.0, 1.0, 1.0], [1, 1, 0]))[1]
    assert float(metrics["ratio/max"]) == pytest.approx(0.9, rel=1e-5)
    assert float(metrics["ratio/mean"]) == pytest.approx(0.7, rel=1e-5)


def test_bool_mask_equals_float_mask():
    new, old, adv, mask = _policy_inputs(MIXED_RATIOS, MIXED_ADV, MIXED_MASK)
    as_float = policy_loss(new, old, adv, mask)[0]
    as_bool = policy_loss(new, old, adv, mask.astype(bool))[0]
    assert float(as_bool) == pytest.approx(float(as_float), abs=1e-7)


# ---------------------------------------------------------------- aggregation on a ragged mask
VALUES_NT = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]], np.float32)
RAGGED_MASK_NT = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
# Row 0: valid 1+2+3 = 6 over 3 tokens (mean 2). Row 1: 5 over 1 token. Row 2: no valid tokens (dropped rollout).
AGG_EXPECTED = {
    # (6 + 5) / 4 tokens = 2.75. Averaging all 12 entries ignoring the mask gives 6.5; seq-mean gives 3.5.
    "token-mean": 2.75,
    # (2 + 5) / 2 sequences = 3.5. Counting the empty row as a sequence would give 7/3 = 2.333.
    "seq-mean-token-mean": 3.5,
    # (6 + 5) / 2 = 5.5. Counting the empty row: 11/3 = 3.667.
    "seq-mean-token-sum": 5.5,
    # verl's formula: (6 + 5) / T = 11 / 4 = 2.75, a sum over rows (not a mean): the mean over the 2 rows would
    # give 1.375, over all 3 rows 0.9167; dividing by each row's own length gives 3.5 instead.
    "seq-mean-token-sum-norm": 2.75,
}


@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_aggregate_ragged(agg):
    assert float(aggregate(VALUES_NT, RAGGED_MASK_NT, agg)) == pytest.approx(AGG_EXPECTED[agg], abs=1e-6)


@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_policy_loss_uses_aggregation(agg):
    # ratio = 1 everywhere and A = -value: per-token loss = max(value·1, value·1) = value, under the cap 3·value.
    old = jnp.zeros_like(VALUES_NT)
    loss, _ = policy_loss(old, old, -VALUES_NT, RAGGED_MASK_NT, agg=agg)
    assert float(loss) == pytest.approx(AGG_EXPECTED[agg], abs=1e-5)


def test_seq_mean_token_sum_norm_is_verls_sum_over_rows():
    # Row 0: 1 + 2 over 2 tokens; row 1: 3 over 1 token; T = 6. verl: (3 + 3) / 6 = 1.0. The distractors all
    # differ: token-mean 6/3 = 2.0, seq-mean-token-sum 3.0, seq-mean-token-mean (1.5 + 3)/2 = 2.25, and the
    # mean over rows of sum / T (a factor N = 2 off) 0.5.
    values = np.array([[1.0, 2.0, 9.0, 9.0, 9.0, 9.0], [3.0, 9.0, 9.0, 9.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.float32)
    got = {agg: float(aggregate(values, mask, agg)) for agg in losses.AGGREGATIONS}
    assert got == pytest.approx({"token-mean": 2.0, "seq-mean-token-sum": 3.0, "seq-mean-token-mean": 2.25,
                                 "seq-mean-token-sum-norm": 1.0}, abs=1e-6)


@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_denominator_of_the_whole_batch_makes_parts_add_up(agg):
    # Gradient accumulation: aggregating rows {0} and {1, 2} separately with the whole batch's denominator and
    # adding gives the whole batch's aggregate (AGG_EXPECTED): e.g. token-mean 6/4 + 5/4 = 2.75.
    whole = losses.Denominators.of(RAGGED_MASK_NT)
    assert (float(whole.tokens), float(whole.seqs)) == (4.0, 2.0)
    parts = sum(float(losses.aggregate(VALUES_NT[rows], RAGGED_MASK_NT[rows], agg, whole))
                for rows in (slice(0, 1), slice(1, 3)))
    assert parts == pytest.approx(AGG_EXPECTED[agg], abs=1e-6)
    # Each part on its own denominator does not add up (token-mean: 6/3 + 5/1 = 7), except under the constant T.
    alone = sum(float(losses.aggregate(VALUES_NT[rows], RAGGED_MASK_NT[rows], agg))
                for rows in (slice(0, 1), slice(1, 3)))
    assert (alone == pytest.approx(AGG_EXPECTED[agg], abs=1e-3)) == (agg == "seq-mean-token-sum-norm")


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="seq-sum"):
        losses.aggregate(VALUES_NT, RAGGED_MASK_NT, "seq-sum")
    with pytest.raises(ValueError, match="token_mean"):
        losses.policy_loss(VALUES_NT, VALUES_NT, VALUES_NT, RAGGED_MASK_NT, agg="token_mean")


@pytest.mark.parametrize("agg", list(AGG_EXPECTED))
def test_all_masked_is_finite_zero(agg):
    new, old, adv, _ = _policy_inputs(MIXED_RATIOS, MIXED_ADV)
    mask = jnp.zeros_like(new)
    loss_fn = lambda lp: policy_loss(lp, old, adv, mask, agg=agg)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(new)
    # 0 / max(0, 1) = 0; a bare 0/0 would be NaN.
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.asarray(grad) == 0.0)
    assert float(sft_loss(new, mask, agg)[0]) == 0.0
    assert float(self_distill_loss(new, old, mask, agg)[0]) == 0.0


def test_eager_matches_jit():
    inputs = _policy_inputs(MIXED_RATIOS, MIXED_ADV, MIXED_MASK)
    eager_loss, eager_metrics = losses.policy_loss(*inputs)
    jit_loss, jit_metrics = policy_loss(*inputs)
    assert float(eager_loss) == pytest.approx(float(jit_loss), abs=1e-6)
    for key, value in jit_metrics.items():
        assert float(eager_metrics[key]) == pytest.approx(float(value), abs=1e-6), key


# ---------------------------------------------------------------- gradient vs central finite differences
def test_policy_loss_gradient_matches_finite_differences():
    # Tokens away from every clip boundary: t1 unclipped, t2 clip-low, t3 clip-high, t4 dual, t5 unclipped
    # (A>0 below range), t6 unclipped (A<0 above range), t7 masked. Only unclipped tokens carry gradient:
    # d/dlp (-A·exp(lp - old)) / 6 = -A·r / 6 → t1 -1.1/6, t5 -0.5/6, t6 +1.5/6, others 0.
    with jax.enable_x64(True):
        ratios = np.array(MIXED_RATIOS, np.float64)
        old = jnp.full((1, 7), OLD, jnp.float64)
        new = old + jnp.log(jnp.asarray(ratios))[None]
        adv = jnp.asarray([MIXED_ADV], jnp.float64)
        mask = jnp.asarray([MIXED_MASK], jnp.float64)
        loss_fn = jax.jit(lambda lp: policy_loss(lp, old, adv, mask)[0])
        grad = np.asarray(jax.grad(loss_fn)(new))
        assert grad.dtype == np.float64
        eps = 1e-6
        numeric = np.zeros(7)
        for t in range(7):
            step = jnp.zeros_like(new).at[0, t].set(eps)
            numeric[t] = (float(loss_fn(new + step)) - float(loss_fn(new - step))) / (2 * eps)
    np.testing.assert_allclose(grad[0], numeric, atol=1e-8)
    np.testing.assert_allclose(grad[0], [-1.1 / 6, 0, 0, 0, -0.5 / 6, 1.5 / 6, 0], atol=1e-12)


# ---------------------------------------------------------------- KL estimators
KL_LOGP = jnp.asarray([[0.0, -1.0, -2.0]])
KL_REF = jnp.asarray([[-1.0, -1.0, 0.0]])
# r = ref − logp = [-1, 0, 2].


def test_kl_k1_k2_k3_values():
    # k1 = logp − ref = [1, 0, -2].
    np.testing.assert_allclose(kl_penalty(KL_LOGP, KL_REF, "k1"), [[1.0, 0.0, -2.0]], atol=1e-6)
    # k2 = ½(logp − ref)² = [0.5, 0, 2].
    np.testing.assert_allclose(kl_penalty(KL_LOGP, KL_REF, "k2"), [[0.5, 0.0, 2.0]], atol=1e-6)
    # k3 = e^r − r − 1 = [e^-1 = 0.367879, 0, e^2 − 3 = 4.389056].
    # With r's sign flipped (logp − ref) it would be [e − 2 = 0.718282, 0, e^-2 + 1 = 1.135335].
    k3_expected = [[math.exp(-1), 0.0, math.exp(2) - 3]]
    np.testing.assert_allclose(kl_penalty(KL_LOGP, KL_REF, "k3"), k3_expected, rtol=1e-6)
    np.testing.assert_allclose(kl_penalty(KL_LOGP, KL_REF, "low_var_kl"), k3_expected, rtol=1e-6)
    # The default is k3, not k1.
    np.testing.assert_allclose(kl_penalty(KL_LOGP, KL_REF), k3_expected, rtol=1e-6)


def test_kl_k3_clamps_value_and_keeps_gradient_finite():
    logp = jnp.asarray([[0.0, 0.0, 0.0, 100.0]])
    ref = jnp.asarray([[5.0, -30.0, 100.0, 0.0]])
    # r = [5, -30, 100, -100]: e^5 − 6 = 142.4 → 10; e^-20 + 20 − 1 = 19 → 10 (r clamped to -20 first);
    # r = ±100 → 10. Without the log-ratio clamp e^100 overflows fp32 to inf and its gradient is inf·0 = NaN.
    kl = kl_penalty(logp, ref, "k3")
    np.testing.assert_allclose(kl, [[10.0, 10.0, 10.0, 10.0]])
    grad = jax.jit(jax.grad(lambda lp: kl_penalty(lp, ref, "k3").sum()))(logp)
    assert np.all(np.isfinite(np.asarray(grad)))
    # Every entry sits on a clamp, so no gradient flows.
    np.testing.assert_allclose(grad, 0.0)


def test_kl_k3_plus_value_is_k3_gradient_is_k2():
    k3 = kl_penalty(KL_LOGP, KL_REF, "k3")
    k3_plus = kl_penalty(KL_LOGP, KL_REF, "k3+")
    np.testing.assert_allclose(k3_plus, k3, rtol=1e-6)
    grad_of = lambda kind: np.asarray(jax.jit(jax.grad(lambda lp: kl_penalty(lp, KL_REF, kind).sum()))(KL_LOGP))
    # ∂k2/∂logp = logp − ref = [1, 0, -2]. ∂k3/∂logp = 1 − e^r = [1 − e^-1 = 0.632, 0, 1 − e^2 = -6.389]:
    # a different vector, so k3+ returning plain k3 would fail here.
    np.testing.assert_allclose(grad_of("k3+"), [[1.0, 0.0, -2.0]], atol=1e-6)
    np.testing.assert_allclose(grad_of("k2"), [[1.0, 0.0, -2.0]], atol=1e-6)
    np.testing.assert_allclose(grad_of("k3"), [[1 - math.exp(-1), 0.0, 1 - math.exp(2)]], rtol=1e-5)


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        losses.kl_penalty(KL_LOGP, KL_REF, "k4")


# ---------------------------------------------------------------- entropy
def test_entropy_matches_numpy_reference():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(2, 3, 7)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float64)
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    entropy = entropy_from_logits(jnp.asarray(logits))
    assert entropy.shape == (2, 3)
    np.testing.assert_allclose(entropy, expected, rtol=1e-5)


def test_entropy_uniform_large_masked_vocab_and_bf16():
    logits = jnp.asarray([[
        # Uniform over V = 5, at any offset: log 5 = 1.609438.
        [7.0, 7.0, 7.0, 7.0, 7.0],
        # p ≈ [1, e^-1000, ...] → H ≈ 0; a naive exp(1000) overflows to inf and gives NaN.
        [1000.0, 0.0, 0.0, 0.0, 0.0],
        # Masked vocabulary entries (−inf) drop out: uniform over 2 → log 2 = 0.693147 (a bare 0·(−inf) is NaN).
        [0.0, 0.0, -jnp.inf, -jnp.inf, -jnp.inf],
    ]])
    np.testing.assert_allclose(entropy_from_logits(logits), [[math.log(5), 0.0, math.log(2)]], atol=1e-6)
    # bf16 logits are computed and returned in fp32.
    assert entropy_from_logits(logits.astype(jnp.bfloat16)).dtype == jnp.float32


# ---------------------------------------------------------------- SFT
def test_sft_loss_token_mean_on_response_tokens():
    logprobs = jnp.asarray([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(logprobs, mask)
    # NLL on valid tokens: 1, 2, 4 → token-mean 7/3 = 2.333. Seq-mean would give (1.5 + 4)/2 = 2.75;
    # ignoring the mask 21/6 = 3.5; a sign error -2.333.
    assert float(loss) == pytest.approx(7 / 3, abs=1e-6)
    assert float(metrics["loss/sft"]) == pytest.approx(7 / 3, abs=1e-6)
    assert float(sft_loss(logprobs, mask, "seq-mean-token-mean")[0]) == pytest.approx(2.75, abs=1e-6)
    # ∂loss/∂logprob = -1/3 on each valid token, 0 elsewhere.
    grad = jax.jit(jax.grad(lambda lp: sft_loss(lp, mask)[0]))(logprobs)
    np.testing.assert_allclose(grad, [[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]], atol=1e-6)


# ---------------------------------------------------------------- self-distillation
SD_LOGP = jnp.asarray([[-1.0, -2.0], [-0.5, -3.0]])
SD_TEACHER = jnp.asarray([[-0.5, -2.5], [-1.0, -1.0]])
SD_MASK = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])
# Advantage = teacher − student = [[0.5, -0.5], [-0.5, (2.0 masked)]].


def test_self_distill_loss_value_and_reverse_kl():
    loss, metrics = self_distill_loss(SD_LOGP, SD_TEACHER, SD_MASK)
    # −A·logp: −(0.5)(−1) = 0.5, −(−0.5)(−2) = −1.0, −(−0.5)(−0.5) = −0.25 → sum −0.75 over 3 = −0.25.
    # With the masked token −(2)(−3) = 6 included: 5.25/4 = 1.3125.
    assert float(loss) == pytest.approx(-0.25, abs=1e-6)
    # reverse KL (k1): logp − teacher = −0.5, 0.5, 0.5 → 0.5/3 = 0.166667 (sign flipped: −0.166667).
    assert float(metrics["distill/reverse_kl"]) == pytest.approx(0.5 / 3, abs=1e-6)


def test_self_distill_gradient_is_minus_detached_advantage():
    grad_fn = jax.grad(lambda lp, tp: self_distill_loss(lp, tp, SD_MASK)[0], argnums=(0, 1))
    grad_student, grad_teacher = jax.jit(grad_fn)(SD_LOGP, SD_TEACHER)
    # ∂/∂logp of −stop_grad(A)·logp / 3 = −A/3 = [[−0.5/3, 0.5/3], [0.5/3, 0]].
    # Without the stop-gradient ∂/∂l of −(t − l)·l is (2l − t)/3: t1 → (−2 + 0.5)/3 = −0.5, not −0.1667.
    np.testing.assert_allclose(grad_student, [[-0.5 / 3, 0.5 / 3], [0.5 / 3, 0.0]], atol=1e-6)
    # The teacher is frozen: it carries no gradient.
    np.testing.assert_allclose(grad_teacher, 0.0)
