"""The project against an independent numpy re-derivation of the authors' verl fork (SPEC §4 "Where the paper and
the authors' code differ"): where they agree (PPO-clip, clip fractions, KL estimators, GRPO, DeltaNorm end to end)
and where `variant="authors"` must reproduce the code (EndNorm, GroupNorm, GRPO, Overlong and unscored rollouts).

The `fork_*` functions restate the code's formulas as read from its `core_algos.py` and judge trainer: the token
reward tensor [N, R] a Process step writes, the masks it zeroes, then the advantage estimator on that tensor.
"""
import math
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, smoke_config
from exprl_jax import advantages as adv
from exprl_jax import losses
from exprl_jax.config import diff, load_config, resolve, to_dict
from exprl_jax.judge.backend import Completion
from exprl_jax.judge.reward import JudgeReward
from exprl_jax.rewards.base import RewardBatch, RewardResult, Span, score_sync

RNG = np.random.default_rng(14)
UNSCORED = None  # a step the judge failed on


# ---------------------------------------------------------------- the fork's formulas, restated in numpy
def fork_masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def fork_agg(loss_NT, mask_NT, mode):
    """verl's agg_loss: every row counts in the seq-mean modes; sum-norm divides the sum over rows by T."""
    if mode == "token-mean":
        return fork_masked_mean(loss_NT, mask_NT)
    row_sums = (loss_NT * mask_NT).sum(-1)
    if mode == "seq-mean-token-sum":
        return row_sums.mean()
    if mode == "seq-mean-token-mean":
        return (row_sums / mask_NT.sum(-1)).mean()
    return row_sums.sum() / mask_NT.shape[-1]


def fork_policy_loss(old, new, advantages, mask, low, high, c, mode):
    """(loss, pg_clipfrac, pg_clipfrac_lower, d loss / d new) of verl's vanilla PPO loss with dual clip."""
    log_ratio = np.clip(new - old, -20, 20)
    ratio = np.exp(log_ratio)
    loss1, loss2 = -advantages * ratio, -advantages * np.clip(ratio, 1 - low, 1 + high)
    clip1 = np.maximum(loss1, loss2)
    loss3 = -advantages * c
    per_token = np.where(advantages < 0, np.minimum(loss3, clip1), clip1)
    clipfrac = fork_masked_mean((loss2 > loss1).astype(float), mask)
    clipfrac_lower = fork_masked_mean(((clip1 > loss3) & (advantages < 0)).astype(float), mask)
    # Gradient by hand: −A·r on a token whose loss is the unclipped branch (inside the clip range both branches
    # are −A·r), 0 on a clipped or dual-capped token; then the aggregation's weight per token.
    inside = (ratio >= 1 - low) & (ratio <= 1 + high)
    unclipped = inside | (loss1 > loss2)
    capped = (advantages < 0) & (clip1 > loss3)
    grad_token = np.where(unclipped & ~capped & (np.abs(new - old) < 20), -advantages * ratio, 0.0)
    n_rows, T = mask.shape
    weight = {"token-mean": mask / mask.sum(), "seq-mean-token-sum": mask / n_rows,
              "seq-mean-token-mean": mask / mask.sum(-1, keepdims=True) / n_rows,
              "seq-mean-token-sum-norm": mask / T}[mode]
    return fork_agg(per_token, mask, mode), clipfrac, clipfrac_lower, grad_token * weight


def fork_kl(new, ref, kind):
    if kind == "k1":
        return new - ref
    if kind == "k2":
        return 0.5 * (new - ref) ** 2
    kl = np.clip(ref - new, -20, 20)
    return np.clip(np.exp(kl) - kl - 1, -10, 10)  # low_var_kl (k3); k3+ has this value


def fork_grpo(rewards, group_size, norm_by_std, eps=1e-6):
    """GRPO over uid groups: a group of one has mean 0 and std 1; torch.std is the sample std."""
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), group_size):
        group = np.asarray(rewards[start:start + group_size], dtype=np.float64)
        mean, std = (0.0, 1.0) if group.size == 1 else (group.mean(), group.std(ddof=1))
        out[start:start + group_size] = (group - mean) / (std + eps) if norm_by_std else group - mean
    return out


def fork_process_tensor(step_scores, spans, length, R, estimator, overlong):
    """One rollout's token reward tensor [R] and whether its loss mask survives, as the judge trainer writes it.

    `step_scores`: the judge's reward per step (None: unparseable). DeltaNorm writes s_t − s_{t−1} per step as it
    goes and, at the last step, subtracts s_T from the first step's span before writing the last one. A failed step
    writes −100; a rollout holding −100 is masked. An Overlong rollout without −100 is zeroed whole.
    """
    tensor = np.zeros(R)
    prev = 0.0
    for t, ((start, end), score) in enumerate(zip(spans, step_scores)):
        if score is None:
            tensor[start:end] = -100.0
            continue
        value = score
        if estimator == "delta":
            value, prev = score - prev, score
            if t == len(spans) - 1:
                first_start, first_end = spans[0]
                tensor[first_start:first_end] -= score
        tensor[start:end] = value
    has_marker = bool((tensor == -100.0).any())
    if overlong and not has_marker:
        tensor[:] = 0.0
    return tensor, not has_marker


def fork_process_advantages(rows, group_size, R, estimator):
    """rows: (step_scores, spans, length, overlong). Returns (advantages [N, R], mask [N, R])."""
    tensors, masks, last = [], [], []
    for scores, spans, length, overlong in rows:
        tensor, kept = fork_process_tensor(scores, spans, length, R, estimator, overlong)
        tensors.append(tensor)
        masks.append((np.arange(R) < length) * float(kept))
        last.append(scores[-1])  # the judge's last-step reward, kept before any zeroing
    tensors, masks = np.array(tensors), np.array(masks)
    if estimator == "delta":
        return tensors, masks
    if estimator == "end":
        return np.array([t - (s if s is not None else 0.0) for t, s in zip(tensors, last)]), masks
    advantages = tensors.copy()  # group: the per-position vector t·m / Σm, averaged over the group's G·R entries
    for start in range(0, len(rows), group_size):
        block = slice(start, start + group_size)
        per_position = tensors[block] * masks[block] / (masks[block].sum(-1, keepdims=True) + 1e-8)
        advantages[block] -= per_position.mean()
    return advantages, masks


def project_process_advantages(rows, group_size, R, mode, variant="authors"):
    """The project's pipeline on the same rollouts: the judge's contract (RewardResult), then process + spread."""
    segment_scores, overlong_last, spans = [], [], []
    for scores, row_spans, length, overlong in rows:
        spans.append(row_spans)
        failed = any(s is None for s in scores)
        segment_scores.append(None if failed else np.zeros(len(scores)) if overlong else np.array(scores, float))
        overlong_last.append(scores[-1] if overlong and not failed else np.nan)
    seg_adv = adv.process(segment_scores, group_size, mode=mode, single_segment="score", variant=variant,
                          spans=spans, padded_length=R, overlong_last_scores=overlong_last)
    lengths = [length for _, _, length, _ in rows]
    return adv.spread_batch(seg_adv, [s if a is not None else None for s, a in zip(spans, seg_adv)], lengths, R)


def random_rows(n_rows, R, *, overlong_frac=0.25, unscored_frac=0.1, shifted_marker=False):
    """Random Process rollouts: 1 to 5 segments, scores on the (N − 1)/4 grid, some Overlong, some failed steps.
    Without `shifted_marker`, a failure never sits only on the first of several steps (under DeltaNorm, the code's
    shifted −100 marker, pinned separately)."""
    rows = []
    while len(rows) < n_rows:
        length = int(RNG.integers(1, R + 1))
        n_segments = int(RNG.integers(1, min(5, length) + 1))
        cuts = np.sort(RNG.choice(np.arange(1, length), n_segments - 1, replace=False)).tolist() + [length]
        spans = list(zip([0] + cuts[:-1], cuts))
        scores = [UNSCORED if RNG.random() < unscored_frac else float(RNG.integers(0, 5)) / 4 for _ in spans]
        overlong = length == R or RNG.random() < overlong_frac
        if overlong:
            length, spans = R, spans[:-1] + [(spans[-1][0], R)]
        only_first_failed = len(scores) > 1 and scores[0] is None and None not in scores[1:]
        if only_first_failed and not shifted_marker:
            continue
        rows.append((scores, spans, length, overlong))
    return rows


# ---------------------------------------------------------------- where the project agrees with the code
@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_ppo_clip_dual_clip_and_clip_fractions_match_the_fork(agg):
    # Ragged masks (no all-masked row: the fork's seq-mean-token-mean is NaN there), ratios far outside
    # [0.8, 1.28] on both sides, mixed-sign advantages; values and gradients in fp64.
    N, T = 6, 9
    old = RNG.normal(-2.0, 0.5, (N, T))
    new = old + RNG.normal(0.0, 1.2, (N, T))
    new[0, 0] = old[0, 0] + 25.0  # beyond the ±20 log-ratio clamp
    advantages = RNG.normal(0.0, 1.0, (N, T))
    lengths = RNG.integers(1, T + 1, N)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    want_loss, want_clipfrac, want_lower, want_grad = fork_policy_loss(old, new, advantages, mask, 0.2, 0.28, 3.0,
                                                                       agg)
    with jax.enable_x64(True):
        def loss_fn(lp):
            return losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask),
                                      clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(new))
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-9, atol=1e-12)
        frac_clip = float(metrics["clip/frac_low"]) + float(metrics["clip/frac_high"])
        np.testing.assert_allclose(frac_clip, want_clipfrac, rtol=1e-7)  # verl's pg_clipfrac
        np.testing.assert_allclose(float(metrics["clip/frac_dual"]), want_lower, rtol=1e-7)  # pg_clipfrac_lower
    assert 0 < want_clipfrac < 1 and 0 < want_lower < 1  # the example exercises both clips and the dual cap


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl", "k3+"])
def test_kl_estimators_match_the_fork(kind):
    # Log-ratios up to ±30: beyond the ±20 clamp of low_var_kl and beyond its ±10 value clamp.
    new = RNG.normal(-2.0, 1.0, (3, 7))
    ref = new + np.concatenate([RNG.normal(0, 2, (3, 5)), [[25.0, -30.0]] * 3], axis=1)
    fork_kind = {"low_var_kl": "k3", "k3+": "k3"}.get(kind, kind)
    with jax.enable_x64(True):
        got = np.asarray(losses.kl_penalty(jnp.asarray(new), jnp.asarray(ref), kind))
        np.testing.assert_allclose(got, fork_kl(new, ref, fork_kind), rtol=1e-12)
        if kind == "k3+":  # upstream verl's straight-through: k3's value, k2's gradient (new − ref)
            grad = jax.grad(lambda lp: losses.kl_penalty(lp, jnp.asarray(ref), kind).sum())(jnp.asarray(new))
            np.testing.assert_allclose(np.asarray(grad), new - ref, rtol=1e-12)
    if kind in ("k3", "low_var_kl", "k3+"):
        assert got.max() == pytest.approx(10.0)  # the value clamp was reached


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_the_fork_with_every_row_scored(scale_by_std):
    # With every row scored and groups of G ≥ 2, both variants are the fork's GRPO.
    rewards = RNG.integers(0, 5, 24) / 4
    want = fork_grpo(rewards, 6, scale_by_std)
    for variant in adv.VARIANTS:
        np.testing.assert_allclose(adv.grpo(rewards, 6, scale_by_std=scale_by_std, variant=variant), want,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_authors_matches_the_fork_with_unscored_rows_and_groups_of_one(scale_by_std):
    # The fork keeps reward 0 for an unscored Outcome rollout (its loss mask is zeroed) inside the statistics.
    for group_size in (1, 4):
        rewards = RNG.integers(0, 5, 16) / 4
        valid = RNG.random(16) > 0.3
        want = fork_grpo(np.where(valid, rewards, 0.0), group_size, scale_by_std)
        got = adv.grpo(np.where(valid, rewards, np.nan), group_size, scale_by_std=scale_by_std, valid=valid,
                       variant="authors")
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got[~valid], 0.0)


def test_delta_norm_matches_the_fork_with_single_segment_score():
    # DeltaNorm is not a variant: with single_segment="score" the paper variant already gives the code's tokens.
    R, G = 12, 4
    rows = random_rows(40, R)
    want, mask = fork_process_advantages(rows, G, R, "delta")
    for variant in adv.VARIANTS:
        got, valid = project_process_advantages(rows, G, R, "delta", variant)
        np.testing.assert_array_equal(valid, mask.any(-1))
        np.testing.assert_allclose(got * mask, want * mask, atol=1e-12)


# ---------------------------------------------------------------- where variant="authors" reproduces the code
@pytest.mark.parametrize("mode", ["end", "group"])
def test_authors_process_matches_the_fork_on_random_batches(mode):
    # 1- to 5-segment rollouts, a quarter Overlong (rewards zeroed; EndNorm still subtracts the judged s_T),
    # failed steps (the rollout masked; GroupNorm counts it as 0), L = R = 12.
    R, G = 12, 4
    rows = random_rows(48, R)
    assert {len(r[0]) for r in rows} >= {1, 2} and any(r[3] for r in rows) and any(None in r[0] for r in rows)
    want, mask = fork_process_advantages(rows, G, R, mode)
    got, valid = project_process_advantages(rows, G, R, mode)
    np.testing.assert_array_equal(valid, mask.any(-1))
    np.testing.assert_allclose(got * mask, want * mask, atol=1e-6)  # the project spreads in float32
    paper, _ = project_process_advantages(rows, G, R, mode, variant="paper")
    assert np.abs((paper - want) * mask).max() > 0.05  # the paper's formulas really differ here


def test_end_norm_authors_hand_example_through_the_fork():
    # Three rollouts, R = 6. (a) s = [0.5, 1.0] over [0, 2), [2, 5): fork tensor [0.5, 0.5, 1, 1, 1, 0] − 1.0
    # → [−0.5, −0.5, 0, 0, 0]. (b) one segment s = 0.75 over [0, 3): 0.75 − 0.75 = 0. (c) Overlong, judged
    # [0.25, 0.5] over [0, 4), [4, 6): tensor zeroed, minus s_T = 0.5 → −0.5 on all 6 tokens.
    rows = [([0.5, 1.0], [(0, 2), (2, 5)], 5, False), ([0.75], [(0, 3)], 3, False),
            ([0.25, 0.5], [(0, 4), (4, 6)], 6, True)]
    want = np.array([[-0.5, -0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [-0.5] * 6])
    fork, mask = fork_process_advantages(rows, 3, 6, "end")
    np.testing.assert_allclose(fork * mask, want)
    got, valid = project_process_advantages(rows, 3, 6, "end")
    np.testing.assert_allclose(got, want)
    assert valid.all()


def test_shifted_marker_is_not_reproduced():
    # The code's DeltaNorm writes −100 on a failed first step, then subtracts s_T from that span at the last step:
    # −100 − 0.5 = −100.5 is no longer the marker, so the rollout is trained with advantage −100.5 on its first
    # segment. The project keeps a rollout with a failed step out of the loss (SPEC §3).
    # An Overlong rollout with the shifted marker is zeroed and trained with advantage 0 on every token.
    rows = [([UNSCORED, 0.25, 0.5], [(0, 2), (2, 3), (3, 4)], 4, False),
            ([UNSCORED, 0.25], [(0, 2), (2, 4)], 4, True)]
    fork, mask = fork_process_advantages(rows, 2, 4, "delta")
    np.testing.assert_allclose(fork, [[-100.5, -100.5, 0.25, 0.25], [0, 0, 0, 0]])
    assert mask.all()
    got, valid = project_process_advantages(rows, 2, 4, "delta")
    assert not valid.any() and not got.any()


# ---------------------------------------------------------------- the judge: Overlong Process rollouts
_FENCED = re.compile(r"^<<TRACE-(\w+)>>\n(.*?)^<<END-TRACE-\1>>$", re.M | re.S)


class ScriptedJudge:
    """Answers by the fenced trace text; records the traces it was asked about."""

    model, decoding = "fake-judge", {"temperature": 0.0}

    def __init__(self, script):
        self.script, self.traces = script, []

    async def complete(self, messages):
        trace = _FENCED.search(messages[-1]["content"]).group(2).rstrip("\n")
        self.traces.append(trace)
        return Completion(text=self.script[trace], latency_s=0.1)

    async def aclose(self):
        pass


def _process_batch(segment_texts, truncated):
    segments, responses = [], []
    for texts in segment_texts:
        starts = np.cumsum([0] + [len(t) for t in texts])
        segments.append([Span(t, int(a), int(b)) for t, a, b in zip(texts, starts[:-1], starts[1:])])
        responses.append("".join(texts))
    n = len(segment_texts)
    return RewardBatch(problems=["p"] * n, references=["r"] * n, answers=["1"] * n, responses=responses,
                       truncated=np.array(truncated), group_size=n, segments=segments)


SCRIPT = {"first ###": "ok\nScore: 2", "second ###": "fine\nScore: 4", "tail": "good\nScore: 5",
          "broken ###": "no score line"}


def test_judge_scores_overlong_process_rollouts_under_the_authors_variant():
    batch = _process_batch([["first ###", "second ###"], ["first ###", "tail"], ["broken ###", "tail"]],
                           [False, True, True])
    backend = ScriptedJudge(SCRIPT)
    result = score_sync(JudgeReward(backend, mode="process", judge_overlong=True), batch)
    assert sorted(set(backend.traces)) == ["broken ###", "first ###", "second ###", "tail"]
    np.testing.assert_allclose(result.segment_scores[0], [0.25, 0.75])  # (2 − 1)/4, (4 − 1)/4
    np.testing.assert_array_equal(result.segment_scores[1], [0.0, 0.0])  # Overlong: all-zero (SPEC §4) ...
    np.testing.assert_allclose(result.overlong_last_scores[:2], [np.nan, 1.0])  # ... its last segment judged 5
    assert result.valid.tolist() == [True, True, False]  # a failed step leaves an Overlong rollout unscored
    assert np.isnan(result.overlong_last_scores[2])
    # EndNorm (authors): the Overlong rollout gets −1.0 on every segment.
    end = adv.process(result.segment_scores, 3, mode="end", variant="authors",
                      overlong_last_scores=result.overlong_last_scores)
    np.testing.assert_allclose(end[0], [-0.5, 0.0])
    np.testing.assert_allclose(end[1], [-1.0, -1.0])


def test_judge_skips_overlong_rollouts_by_default_and_in_outcome_mode():
    batch = _process_batch([["first ###"], ["second ###", "tail"]], [False, True])
    backend = ScriptedJudge(SCRIPT)
    result = score_sync(JudgeReward(backend, mode="process"), batch)
    assert backend.traces == ["first ###"] and result.overlong_last_scores is None
    np.testing.assert_array_equal(result.segment_scores[1], [0.0, 0.0])
    outcome = ScriptedJudge({"first ###": "Score: 3"})
    result = score_sync(JudgeReward(outcome, mode="outcome", judge_overlong=True), batch)
    assert outcome.traces == ["first ###"] and result.scores.tolist() == [0.5, 0.0]


def test_delta_norm_end_to_end_from_judge_text_matches_the_fork():
    # Judge answers → (N − 1)/4 → DeltaNorm with single_segment="score" → token advantages, against the fork's
    # tensor. Rollout 0: s = [0.25, 0.75] over tokens [0, 9), [9, 19): A = [0.25 − 0.75, 0.75 − 0.25].
    # Rollout 1 (one segment): +s_1 = 1.0 on every token.
    batch = _process_batch([["first ###", "second ###"], ["tail"]], [False, False])
    result = score_sync(JudgeReward(ScriptedJudge(SCRIPT), mode="process"), batch)
    seg_adv = adv.process(result.segment_scores, 2, mode="delta", single_segment="score")
    spans = [[(s.start, s.end) for s in row] for row in batch.segments]
    got, valid = adv.spread_batch(seg_adv, spans, [19, 4], 20)
    rows = [([0.25, 0.75], spans[0], 19, False), ([1.0], spans[1], 4, False)]
    want, mask = fork_process_advantages(rows, 2, 20, "delta")
    np.testing.assert_allclose(got, want * mask, atol=1e-7)
    np.testing.assert_allclose(got[0, [0, 8, 9, 18, 19]], [-0.5, -0.5, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(got[1, :5], [1, 1, 1, 1, 0])


# ---------------------------------------------------------------- wiring: config -> steps
def _runner(cfg):
    from exprl_jax.methods import METHOD_SPECS
    from exprl_jax.steps import StepRunner

    runner = object.__new__(StepRunner)
    runner.exp = types.SimpleNamespace(spec=METHOD_SPECS[cfg.method])
    runner.cfg = cfg
    return runner


def _rollouts(lengths, truncated, R):
    from exprl_jax.data import QARecord
    from exprl_jax.rollouts import Rollouts

    n = len(lengths)
    return Rollouts(records=[QARecord(id="0", problem="p", reference="r", answer="1")], group_size=n,
                    prompt_tokens=np.ones((n, 2), np.int32), prompt_mask=np.ones((n, 2), np.int32),
                    tokens=np.ones((n, R), np.int32), logprobs=np.zeros((n, R), np.float32),
                    lengths=np.array(lengths, np.int32), truncated=np.array(truncated), texts=["x"] * n)


def test_build_batch_passes_the_variants_through():
    # Process, GroupNorm, authors, L = rollout.max_new_tokens = 8. Rollout 0: spans [0, 2), [2, 4), s = [0.5, 1]
    # → token-weighted mean 0.75, / 8 = 0.09375. Rollout 1: Overlong, zeros → 0. Rollout 2: unscored → 0.
    # b = 0.09375 / 3 = 0.03125: A_0 = [0.46875, 0.46875, 0.96875, 0.96875], A_1 = −0.03125 on its 8 tokens.
    cfg = smoke_config(**{"method": "exprl_process", "process.mode": "group", "process.variant": "authors",
                          "rollout.max_new_tokens": 8})
    r = _rollouts([4, 8, 3], [False, True, False], 8)
    segments = [[Span("a", 0, 2), Span("b", 2, 4)], [Span("c", 0, 8)], [Span("d", 0, 3)]]
    result = RewardResult(valid=np.array([True, True, False]),
                          segment_scores=[np.array([0.5, 1.0]), np.zeros(1), None],
                          overlong_last_scores=np.array([np.nan, 0.75, np.nan]))
    batch, _ = _runner(cfg).build_batch(r, (result, segments, np.zeros(3, bool), 0.0), None)
    np.testing.assert_allclose(batch["advantages"][0], [0.46875, 0.46875, 0.96875, 0.96875, 0, 0, 0, 0])
    np.testing.assert_allclose(batch["advantages"][1], [-0.03125] * 8)
    assert not batch["advantages"][2].any() and not batch["response_mask"][2].any()
    # EndNorm (authors): the Overlong rollout gets −0.75 (its judged last segment) on every token.
    cfg = smoke_config(**{"method": "exprl_process", "process.mode": "end", "process.variant": "authors"})
    batch, _ = _runner(cfg).build_batch(r, (result, segments, np.zeros(3, bool), 0.0), None)
    np.testing.assert_allclose(batch["advantages"][0, :4], [-0.5, -0.5, 0, 0])
    np.testing.assert_allclose(batch["advantages"][1], [-0.75] * 8)
    # GRPO (authors): a group of one keeps r / (1 + 1e-6).
    cfg = resolve(smoke_config(**{"method": "grpo", "loss.grpo_variant": "authors", "rollout.group_size": 1}))
    r = _rollouts([3], [False], 4)
    batch, _ = _runner(cfg).build_batch(r, (RewardResult(valid=np.array([True]), scores=np.array([1.0])), None,
                                            np.ones(1, bool), 0.0), None)
    np.testing.assert_allclose(batch["advantages"][0], [1 / (1 + 1e-6)] * 3 + [0.0], rtol=1e-6)


# ---------------------------------------------------------------- the replication configs
AUTHORS_KEYS = {"process.variant": "authors", "process.single_segment": "score", "loss.grpo_variant": "authors"}


def _config(name):
    return load_config(os.path.join(ROOT, "experiments", "configs", name))


def test_authors_config_changes_exactly_what_its_docstring_lists():
    base, authors = _config("qwen3_4b_exprl.py"), _config("qwen3_4b_exprl_authors.py")
    changed = {line.split(":")[0] for line in diff(to_dict(base), to_dict(authors))}
    assert changed == set(AUTHORS_KEYS) | {"name"}
    for key, value in AUTHORS_KEYS.items():
        section, field = key.split(".")
        assert getattr(getattr(authors, section), field) == value
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "authors_cfg", os.path.join(ROOT, "experiments", "configs", "qwen3_4b_exprl_authors.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key in AUTHORS_KEYS:
        assert key in module.__doc__


def test_process_authors_config_uses_the_process_scripts_settings():
    # The authors' Process scripts: 16 samples per prompt, the whole 36-prompt batch in one update, clip 0.26.
    cfg = _config("qwen3_4b_exprl_process_authors.py")
    assert cfg.method == "exprl_process" and cfg.process.mode == "delta"
    assert (cfg.rollout.group_size, cfg.loss.ppo_mini_batch_size, cfg.loss.clip_high) == (16, 36 * 16, 0.26)
    assert (cfg.process.variant, cfg.process.single_segment, cfg.loss.grpo_variant) == ("authors", "score",
                                                                                        "authors")


def test_variant_config_keys_are_checked():
    with pytest.raises(ValueError, match="config.process.variant='verl'"):
        smoke_config(**{"process.variant": "verl"})
    with pytest.raises(ValueError, match="config.loss.grpo_variant"):
        smoke_config(**{"loss.grpo_variant": "code"})


@pytest.mark.slow
def test_authors_variant_runs_end_to_end(tmp_path):
    # The tiny model's rollouts are mostly Overlong: the judge scores them, EndNorm subtracts their last score.
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    cfg = smoke_config(**{"method": "exprl_process", "process.mode": "end", "process.variant": "authors",
                          "process.single_segment": "score", "train.steps": 1, "eval.at_start": False,
                          "eval.at_end": False})
    Experiment(cfg, str(tmp_path)).run()
    (row,) = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss/total" in r]
    assert math.isfinite(row["loss/total"]) and row["response/truncated_frac"] > 0.5
    # 16 rollouts: more judge calls than scorable rollouts, so the Overlong ones were judged too.
    assert row["judge/calls_per_step"] > (1 - row["response/truncated_frac"]) * 16
