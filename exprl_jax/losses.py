"""Per-token loss math for the Stage-I policy update and its baselines (SPEC §5, §6).

Pure array functions: arrays in, `(loss, metrics)` out, safe inside `jax.jit`. The model call, rewards and
advantages live elsewhere. Shapes: N sequences, T tokens, V vocab.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl", "k3+")

# exp(20) ≈ 4.9e8 is finite in fp32; beyond it exp() overflows and its gradient becomes inf·0 = NaN.
_LOG_RATIO_BOUND = 20.0
_K3_BOUND = 10.0


def _float(x):
    """At least fp32, so bf16 inputs are computed in fp32 while fp64 inputs (gradient checks) stay fp64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(mask):
    return jnp.asarray(mask).astype(bool)


def _zero_where_invalid(x, valid_NT):
    # Padding may hold anything (NaN, -inf log-probs). Zeroing it *before* any arithmetic keeps both the value and
    # the gradient clean; multiplying by the mask afterwards would still give NaN·0 = NaN.
    return jnp.where(valid_NT, x, jnp.zeros_like(x))


class Denominators(NamedTuple):
    """The counts every aggregation divides by, fixed for a whole mini-batch: with gradient accumulation each
    micro-batch divides by the mini-batch's counts, so summing the micro-batches' losses and metrics gives exactly
    the unsplit values (train_state.train_step)."""
    tokens: jax.Array  # valid tokens
    seqs: jax.Array  # sequences with at least one valid token

    @classmethod
    def of(cls, mask_NT) -> "Denominators":
        valid_NT = _valid(mask_NT)
        return cls(jnp.sum(valid_NT).astype(jnp.float32), jnp.sum(jnp.any(valid_NT, axis=-1)).astype(jnp.float32))


def _masked_mean(x_NT, valid_NT, count=None):
    count = jnp.sum(valid_NT) if count is None else count
    return jnp.sum(_zero_where_invalid(x_NT, valid_NT)) / jnp.maximum(count, 1).astype(x_NT.dtype)


def _check_aggregation(agg):
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {AGGREGATIONS}")


def aggregate(per_token_NT, mask_NT, agg: str = "token-mean", denominators: Denominators | None = None):
    """Reduces a per-token loss [N, T] to a scalar over the valid tokens of `mask_NT` (SPEC §5: token-mean).

    The modes are verl's `loss_agg_mode`s, with verl's formulas:
    - "token-mean": sum over all valid tokens / their count; every token weighs the same, long answers weigh more.
    - "seq-mean-token-mean": mean over each sequence's valid tokens, then mean over sequences.
    - "seq-mean-token-sum": sum over each sequence's valid tokens, then mean over sequences.
    - "seq-mean-token-sum-norm" (Dr. GRPO): the sum over sequences of each sequence's token sum, divided by T (the
      padded length, a constant), so the loss carries no length bias. Not a mean over sequences.
    The two "seq-mean" modes average over the sequences with at least one valid token: a rollout whose mask was
    zeroed (an unscored rollout, SPEC §3) is dropped from the loss, not counted as a zero-loss sequence that would
    shrink everyone else's weight. (verl counts it in seq-mean-token-sum and returns NaN in seq-mean-token-mean.)
    All counts are floored at 1, so an all-masked batch gives 0, never NaN.

    `denominators` (default: this batch's own counts) replaces the token and sequence counts: given a whole
    mini-batch's, summing the aggregates of its parts gives the aggregate of the whole (micro-batches).
    """
    _check_aggregation(agg)
    per_token_NT = _float(per_token_NT)
    valid_NT = _valid(mask_NT)
    if denominators is None:
        denominators = Denominators.of(valid_NT)
    if agg == "token-mean":
        return _masked_mean(per_token_NT, valid_NT, denominators.tokens)
    dtype = per_token_NT.dtype
    tokens_N = jnp.sum(valid_NT, axis=-1)
    sums_N = jnp.sum(_zero_where_invalid(per_token_NT, valid_NT), axis=-1)
    if agg == "seq-mean-token-sum-norm":
        return jnp.sum(sums_N) / per_token_NT.shape[-1]
    if agg == "seq-mean-token-mean":
        sums_N = sums_N / jnp.maximum(tokens_N, 1).astype(dtype)
    return jnp.sum(sums_N) / jnp.maximum(denominators.seqs, 1).astype(dtype)


def kl_penalty(logprobs, ref_logprobs, kind: str = "k3"):
    """Per-token estimate [N, T] of KL(π‖π_ref) from tokens sampled from π (SPEC §5: loss term, k3, coef 0.001).

    With the log-ratio r = ref_logprobs − logprobs:
    - "k1": −r = logprobs − ref. Unbiased in value, but as a *loss* its expected gradient is zero:
      E_π[∇ log π] = 0, so it does not pull π toward π_ref. Do not use it as the penalty (SPEC §5).
    - "k2": ½ r²; biased in value, but its gradient −r·∇log π has expectation exactly ∇KL(π‖π_ref) on-policy.
    - "k3" (alias "low_var_kl"): exp(r) − r − 1 with r clamped to ±20 and the value clamped to ±10;
      unbiased in value, never negative, low variance. The paper's choice.
    - "k3+": k3's value in the forward pass, k2's gradient (straight-through: k2 + stop_gradient(k3 − k2)).
    The names and clamps are verl's `kl_loss_type`s ("k3+" is upstream verl's; the authors' fork predates it);
    verl's aliases "kl" (k1), "mse" (k2) and its "abs" are not offered.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
    logprobs, ref_logprobs = _float(logprobs), _float(ref_logprobs)
    if kind == "k1":
        return logprobs - ref_logprobs
    k2 = 0.5 * jnp.square(logprobs - ref_logprobs)
    if kind == "k2":
        return k2
    log_ratio = jnp.clip(ref_logprobs - logprobs, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    k3 = jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -_K3_BOUND, _K3_BOUND)
    if kind == "k3+":
        return k2 + jax.lax.stop_gradient(k3 - k2)
    return k3


def policy_loss(
    logprobs, old_logprobs, advantages, mask, *,
    clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0, agg: str = "token-mean",
    denominators: Denominators | None = None,
):
    """PPO-clip with an asymmetric clip range and dual-clip (SPEC §5). All inputs [N, T]; returns (loss, metrics).

    ratio = exp(clamp(logprobs − old_logprobs, ±20)); per-token loss = max(−A·ratio, −A·clip(ratio, 1−clip_low,
    1+clip_high)), the pessimistic of the two. For A < 0 that loss grows without bound as the ratio grows (the clip
    only bounds the side that helps), so dual-clip caps it at −A·dual_clip; `dual_clip=None` turns the cap off.

    Metrics are over valid tokens, whatever `agg` is; with `denominators` they are this micro-batch's share of the
    mini-batch's value (summed over micro-batches; "ratio/max" takes their max). "clip/frac_*" count tokens whose loss comes from a clipped
    branch (gradient zero there). "kl/approx_old" is the k3 estimate of KL(π_old‖π_θ): the tokens were sampled
    from π_old, so k3 of r = logprobs − old_logprobs is unbiased for that direction and never negative.
    verl's names: clip_low/clip_high/dual_clip are clip_ratio_low/clip_ratio_high/clip_ratio_c (verl cannot turn
    the dual clip off); its pg_clipfrac is frac_low + frac_high, its pg_clipfrac_lower is frac_dual; its ppo_kl
    metric is the k1 mean of old − new, not k3. `denominators`: see `aggregate`.
    """
    _check_aggregation(agg)  # before any work, so a typo fails at trace time with nothing computed
    if dual_clip is not None and dual_clip <= 1.0:
        # At c ≤ 1 the cap would freeze (zero gradient) bad tokens whose ratio is still ≤ 1, before they have moved.
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (or None to turn it off)")
    valid_NT = _valid(mask)
    logprobs = _zero_where_invalid(_float(logprobs), valid_NT)
    old_logprobs = _zero_where_invalid(_float(old_logprobs), valid_NT)
    advantages_NT = _zero_where_invalid(jnp.broadcast_to(_float(advantages), logprobs.shape), valid_NT)

    log_ratio = jnp.clip(logprobs - old_logprobs, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_NT * ratio
    clipped = -advantages_NT * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    negative = advantages_NT < 0
    if dual_clip is None:
        dual_active = jnp.zeros_like(negative)
    else:
        dual_cap = -advantages_NT * dual_clip
        dual_active = negative & (per_token > dual_cap)
        per_token = jnp.where(dual_active, dual_cap, per_token)

    denominators = Denominators.of(valid_NT) if denominators is None else denominators
    loss = aggregate(per_token, valid_NT, agg, denominators)

    def frac(condition_NT):
        return _masked_mean(condition_NT.astype(ratio.dtype), valid_NT, denominators.tokens)

    metrics = {
        "loss/policy": loss,
        "clip/frac_low": frac(negative & (ratio < 1.0 - clip_low)),
        "clip/frac_high": frac((advantages_NT > 0) & (ratio > 1.0 + clip_high)),
        "clip/frac_dual": frac(dual_active),
        "ratio/mean": _masked_mean(ratio, valid_NT, denominators.tokens),
        # ratio > 0, so the zeros put in place of masked tokens never win the max.
        "ratio/max": jnp.max(_zero_where_invalid(ratio, valid_NT)),
        "kl/approx_old": _masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), valid_NT, denominators.tokens),
    }
    return loss, metrics


def entropy_from_logits(logits_NTV):
    """Entropy [N, T] of softmax(logits) in fp32 (SPEC §5 Stage II bonus, §7 statistics).

    H = logsumexp(z) − Σ p·z, which needs no log of a probability (no log 0) and no exp of a large logit.
    Logits of −inf (a masked vocabulary entry) have p = 0 and contribute nothing.
    """
    logits_NTV = _float(logits_NTV)
    log_normaliser_NT = jax.nn.logsumexp(logits_NTV, axis=-1)
    probs_NTV = jax.nn.softmax(logits_NTV, axis=-1)
    finite_logits_NTV = jnp.where(jnp.isfinite(logits_NTV), logits_NTV, 0.0)
    return log_normaliser_NT - jnp.sum(probs_NTV * finite_logits_NTV, axis=-1)


def sft_loss(logprobs_NT, mask_NT, agg: str = "token-mean", denominators: Denominators | None = None):
    """SFT baseline (SPEC §6): next-token cross-entropy −log π(y_k | x, y_<k) on response tokens. (loss, metrics)."""
    valid_NT = _valid(mask_NT)
    denominators = Denominators.of(valid_NT) if denominators is None else denominators
    nll_NT = -_zero_where_invalid(_float(logprobs_NT), valid_NT)
    loss = aggregate(nll_NT, valid_NT, agg, denominators)
    return loss, {"loss/sft": loss, "sft/nll_token_mean": _masked_mean(nll_NT, valid_NT, denominators.tokens)}


def self_distill_loss(logprobs, teacher_logprobs, mask, agg: str = "token-mean",
                      denominators: Denominators | None = None):
    """On-policy self-distillation baseline (SPEC §6). All inputs [N, T]; returns (loss, metrics).

    Per-token advantage A = stop_gradient(teacher_logprobs − logprobs); loss = −A·logprobs. Its gradient,
    −A·∇log π, is the policy gradient of the reverse KL(π‖π_teacher) with the per-token log-ratio as the reward;
    the teacher gets no gradient. "distill/reverse_kl" is the k1 estimate of that KL, mean over valid tokens.
    """
    valid_NT = _valid(mask)
    denominators = Denominators.of(valid_NT) if denominators is None else denominators
    logprobs = _zero_where_invalid(_float(logprobs), valid_NT)
    teacher_logprobs = _zero_where_invalid(_float(teacher_logprobs), valid_NT)
    advantages_NT = jax.lax.stop_gradient(teacher_logprobs - logprobs)
    loss = aggregate(-advantages_NT * logprobs, valid_NT, agg, denominators)
    metrics = {
        "loss/distill": loss,
        "distill/reverse_kl": jax.lax.stop_gradient(
            _masked_mean(logprobs - teacher_logprobs, valid_NT, denominators.tokens)),
        "distill/advantage_mean": _masked_mean(advantages_NT, valid_NT, denominators.tokens),
    }
    return loss, metrics
