"""Advantage math (SPEC §4) on literal vectors, each expected value derived by hand."""
import math

import numpy as np
import pytest

from exprl_jax import advantages as adv
from exprl_jax.rewards.base import Span


# ---------------------------------------------------------------- grpo


def test_grpo_two_groups_sample_std():
    # Group 0: r = [0, 1, 1, 0], mean 0.5, deviations ±0.5, sample var = 4·0.25 / 3 = 1/3, std = 0.57735.
    #   A = ±0.5 / (0.57735 + 1e-6) = ±0.866024. (Population std 0.5 would give ±1.0: the ddof bug.)
    # Group 1: r = [1, 2, 3, 6], mean 3, deviations [-2, -1, 0, 3], sample var = (4+1+0+9)/3 = 14/3,
    #   std = 2.160247; A = [-0.925820, -0.462910, 0, 1.388730].
    got = adv.grpo([0, 1, 1, 0, 1, 2, 3, 6], group_size=4)
    s0, s1 = math.sqrt(1 / 3), math.sqrt(14 / 3)
    want = [-0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6)]
    want += [-2 / (s1 + 1e-6), -1 / (s1 + 1e-6), 0.0, 3 / (s1 + 1e-6)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got[:2], [-0.866024, 0.866024], atol=1e-6)


def test_grpo_without_std_is_reward_minus_mean():
    # Stage II / Dr.GRPO: group [1, 0, 0] has mean 1/3 → [2/3, -1/3, -1/3]; group [0, 0, 0] → zeros.
    got = adv.grpo([1, 0, 0, 0, 0, 0], group_size=3, scale_by_std=False)
    np.testing.assert_allclose(got, [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], rtol=1e-12)


def test_grpo_constant_group_is_zero_not_nan():
    # All rewards equal: deviations 0, std 0, 0 / (0 + eps) = 0 (not 0/0 = NaN). Judge scores (N − 1)/4 are
    # exact in binary, so 0.75 gives exactly 0; 0.7 leaves float rounding of ~1e-16 / eps = ~1e-10.
    np.testing.assert_array_equal(adv.grpo([0.75, 0.75, 0.75], group_size=3), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(adv.grpo([0.7, 0.7, 0.7], group_size=3), [0.0, 0.0, 0.0], atol=1e-9)


def test_grpo_valid_mask_excludes_unscored_rows():
    # Group 0: rows 0, 1, 3 scored with r = [0, 1, 1] (row 2 is NaN, unscored). Mean 2/3, deviations
    #   [-2/3, 1/3, 1/3], sample var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735
    #   → A = [-1.154699, 0.577350, 0, 0.577350].
    #   Had the NaN row counted as 0: mean 0.5 and A = ±0.866: the "failed judge became reward 0" bug.
    # Group 1: one scored row only → all zeros.
    rewards = [0, 1, np.nan, 1, 0.3, np.nan, np.nan, np.nan]
    valid = np.array([True, True, False, True, True, False, False, False])
    got = adv.grpo(rewards, 4, valid=valid)
    s = math.sqrt(1 / 3) + 1e-6
    np.testing.assert_allclose(got, [-2 / 3 / s, 1 / 3 / s, 0, 1 / 3 / s, 0, 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(got[0], -1.154699, atol=1e-6)


def test_grpo_group_of_one_valid_row_is_zero_even_without_std():
    got = adv.grpo([0.9, 0.1], 2, scale_by_std=False, valid=np.array([True, False]))
    np.testing.assert_array_equal(got, [0.0, 0.0])


@pytest.mark.parametrize("reward", [np.nan, np.inf])
def test_grpo_non_finite_valid_reward_raises(reward):
    with pytest.raises(ValueError, match=r"non-finite reward in valid rows \[1\]"):
        adv.grpo([0.0, reward, 1.0, 0.0], 2)


def test_grpo_shape_errors():
    with pytest.raises(ValueError, match="7 rows .* group_size=3"):
        adv.grpo(np.zeros(7), 3)
    with pytest.raises(ValueError, match="group_size"):
        adv.grpo(np.zeros(4), 0)
    with pytest.raises(ValueError, match="bool array"):
        adv.grpo(np.zeros(4), 2, valid=[1, 1, 0, 1])
    with pytest.raises(ValueError, match="1-D"):
        adv.grpo(np.zeros((2, 2)), 2)


# ---------------------------------------------------------------- process


def test_delta_norm():
    # s = [0.25, 0.5, 1.0]: A_1 = s_1 − s_T = 0.25 − 1.0 = −0.75; A_2 = 0.5 − 0.25 = 0.25; A_3 = 1.0 − 0.5 = 0.5.
    # Second rollout s = [0.5, 0.25]: A_1 = 0.5 − 0.25 = 0.25, A_2 = 0.25 − 0.5 = −0.25.
    got = adv.process([[0.25, 0.5, 1.0], [0.5, 0.25]], group_size=2, mode="delta")
    np.testing.assert_allclose(got[0], [-0.75, 0.25, 0.5])
    np.testing.assert_allclose(got[1], [0.25, -0.25])


def test_delta_norm_single_segment_rules():
    # T = 1: formula s_1 − s_1 = 0 ("zero"); the authors' code gives +s_1 = 0.75 ("score").
    # Multi-segment rollouts are the same under both rules.
    scores = [[0.75], [0.0, 0.5]]
    zero = adv.process(scores, 2, mode="delta", single_segment="zero")
    score = adv.process(scores, 2, mode="delta", single_segment="score")
    np.testing.assert_array_equal(zero[0], [0.0])
    np.testing.assert_array_equal(score[0], [0.75])
    np.testing.assert_allclose(zero[1], [-0.5, 0.5])
    np.testing.assert_allclose(score[1], [-0.5, 0.5])


def test_end_norm():
    # s = [0.25, 0.5, 1.0]: A_1 = 0.25 − 1.0 = −0.75, A_2 = 0.5 − 1.0 = −0.5, A_3 = s_T = 1.0.
    # T = 1, s = [0.5]: A_T = s_T = 0.5 (the formula; `single_segment` does not apply to "end").
    for rule in ("zero", "score"):
        got = adv.process([[0.25, 0.5, 1.0], [0.5]], 2, mode="end", single_segment=rule)
        np.testing.assert_allclose(got[0], [-0.75, -0.5, 1.0])
        np.testing.assert_allclose(got[1], [0.5])


def test_group_norm_uses_mean_of_rollout_means_over_valid_rollouts():
    # Group 0: rollout means 0.5 (of [0, 1]) and 1.0 (of [1]); row 2 unscored → baseline (0.5 + 1.0)/2 = 0.75.
    #   (A token-weighted mean over [0, 1, 1] would be 2/3: the plausible bug.)
    #   A = [0 − 0.75, 1 − 0.75] = [−0.75, 0.25]; [1 − 0.75] = [0.25]; None.
    # Group 1: means 0.25 and 0.75 → baseline 0.5; A = [−0.25, −0.25] and [0.25].
    scores = [[0.0, 1.0], [1.0], None, [0.25, 0.25], [0.75], None]
    got = adv.process(scores, 3, mode="group")
    np.testing.assert_allclose(got[0], [-0.75, 0.25])
    np.testing.assert_allclose(got[1], [0.25])
    assert got[2] is None and got[5] is None
    np.testing.assert_allclose(got[3], [-0.25, -0.25])
    np.testing.assert_allclose(got[4], [0.25])


def test_process_unscored_rollouts_stay_none():
    for mode in adv.PROCESS_MODES:
        got = adv.process([None, [0.5, 0.0]], 2, mode=mode)
        assert got[0] is None
        assert got[1] is not None


def test_process_errors():
    with pytest.raises(ValueError, match="rollout 1: empty segment scores"):
        adv.process([[0.5], []], 2)
    with pytest.raises(ValueError, match="unknown process advantage mode 'prefix'"):
        adv.process([[0.5]], 1, mode="prefix")
    with pytest.raises(ValueError, match="single_segment"):
        adv.process([[0.5]], 1, single_segment="one")
    with pytest.raises(ValueError, match="rollout 0: non-finite"):
        adv.process([[0.5, np.nan]], 1)
    with pytest.raises(ValueError, match="3 rows .* group_size=2"):
        adv.process([[0.5]] * 3, 2)


# ---------------------------------------------------------------- variant="authors" (the authors' code)


def test_grpo_authors_group_of_one_keeps_the_reward():
    # The code's group of one has mean 0 and std 1: A = (r − 0) / (1 + 1e-6); without std A = r. The paper's
    # variant gives 0 (no baseline).
    np.testing.assert_allclose(adv.grpo([0.5, 1.0], 1, variant="authors"), [0.5 / (1 + 1e-6), 1 / (1 + 1e-6)],
                               rtol=1e-12)
    np.testing.assert_array_equal(adv.grpo([0.5, 1.0], 1, scale_by_std=False, variant="authors"), [0.5, 1.0])
    np.testing.assert_array_equal(adv.grpo([0.5, 1.0], 1), [0.0, 0.0])


def test_grpo_authors_counts_unscored_rows_as_zero():
    # Group [0, 1, unscored, 1]: the code's statistics see [0, 1, 0, 1]: mean 0.5, sample var 4·0.25/3 = 1/3,
    # std 0.57735 → A = ±0.866024 (the unscored row is masked: 0 here). The paper's variant leaves the row out:
    # [-1.154700, 0.577350, 0, 0.577350] (test_grpo_valid_mask_excludes_unscored_rows).
    valid = np.array([True, True, False, True])
    got = adv.grpo([0, 1, np.nan, 1], 4, valid=valid, variant="authors")
    s = math.sqrt(1 / 3) + 1e-6
    np.testing.assert_allclose(got, [-0.5 / s, 0.5 / s, 0.0, 0.5 / s], rtol=1e-12)
    np.testing.assert_allclose(got[0], -0.866024, atol=1e-6)
    # Without std: [0 − 0.5, 1 − 0.5, masked, 1 − 0.5].
    np.testing.assert_allclose(adv.grpo([0, 1, np.nan, 1], 4, scale_by_std=False, valid=valid, variant="authors"),
                               [-0.5, 0.5, 0.0, 0.5])


def test_end_norm_authors_last_segment_one_segment_and_overlong():
    # A_t = s_t − s_T for every t: [0.25 − 1, 0.5 − 1, 1 − 1] = [−0.75, −0.5, 0] (the paper's A_T is s_T = 1.0).
    # T = 1: s_1 − s_1 = 0 (paper: +0.5). Overlong row (scores zeroed, the judge gave its last segment 0.75):
    # 0 − 0.75 on every segment (paper: 0). Unscored stays None.
    scores = [[0.25, 0.5, 1.0], [0.5], [0.0, 0.0], None]
    got = adv.process(scores, 2, mode="end", variant="authors", overlong_last_scores=[np.nan, np.nan, 0.75, np.nan])
    np.testing.assert_allclose(got[0], [-0.75, -0.5, 0.0])
    np.testing.assert_array_equal(got[1], [0.0])
    np.testing.assert_allclose(got[2], [-0.75, -0.75])
    assert got[3] is None
    paper = adv.process(scores, 2, mode="end")
    np.testing.assert_allclose(paper[1], [0.5])
    np.testing.assert_array_equal(paper[2], [0.0, 0.0])


def test_group_norm_authors_token_weighted_over_padded_length():
    # Group of 3, L = 10.
    #   row 0: spans [0, 2), [2, 6), s = [0.5, 1.0]: token-weighted mean (2·0.5 + 4·1.0)/6 = 5/6; / L = 1/12.
    #   row 1: unscored → counts as 0.   row 2: one span [0, 4), s = 0.25 → 0.25 / 10 = 0.025.
    #   b = (1/12 + 0 + 0.025) / 3 = 0.036111. A_0 = [0.463889, 0.963889], A_2 = [0.213889].
    # The paper's baseline is the mean of the scored rows' means, (0.75 + 0.25)/2 = 0.5: A_0 = [0, 0.5].
    scores = [[0.5, 1.0], None, [0.25]]
    spans = [[(0, 2), (2, 6)], None, [Span("x", 0, 4)]]
    got = adv.process(scores, 3, mode="group", variant="authors", spans=spans, padded_length=10)
    b = (1 / 12 + 0.025) / 3
    np.testing.assert_allclose(got[0], [0.5 - b, 1.0 - b], rtol=1e-12)
    np.testing.assert_allclose(got[0], [0.463889, 0.963889], atol=1e-6)
    assert got[1] is None
    np.testing.assert_allclose(got[2], [0.25 - b], rtol=1e-12)
    np.testing.assert_allclose(adv.process(scores, 3, mode="group")[0], [0.0, 0.5])
    # At the paper's L = 16,384 the baseline is ~1e-5: the advantage is in effect the raw score.
    far = adv.process(scores, 3, mode="group", variant="authors", spans=spans, padded_length=16384)
    np.testing.assert_allclose(far[0], [0.5, 1.0], atol=3e-5)


def test_delta_norm_is_the_same_in_both_variants():
    scores = [[0.25, 0.5, 1.0], [0.75]]
    for rule in ("zero", "score"):
        paper = adv.process(scores, 2, mode="delta", single_segment=rule)
        authors = adv.process(scores, 2, mode="delta", single_segment=rule, variant="authors")
        for p, a in zip(paper, authors):
            np.testing.assert_array_equal(p, a)


def test_authors_variant_errors():
    with pytest.raises(ValueError, match="unknown variant 'verl'"):
        adv.process([[0.5]], 1, variant="verl")
    with pytest.raises(ValueError, match="unknown variant"):
        adv.grpo([0.5], 1, variant="code")
    with pytest.raises(ValueError, match="spans=.*padded_length="):
        adv.process([[0.5]], 1, mode="group", variant="authors")
    with pytest.raises(ValueError, match="rollout 0: 2 segment scores but 1 spans"):
        adv.process([[0.5, 0.5]], 1, mode="group", variant="authors", spans=[[(0, 3)]], padded_length=4)
    with pytest.raises(ValueError, match=r"rollout 0: span lengths \[3.0, 2.0\] do not fit in L=4"):
        adv.process([[0.5, 0.5]], 1, mode="group", variant="authors", spans=[[(0, 3), (3, 5)]], padded_length=4)
    with pytest.raises(ValueError, match="overlong_last_scores has shape"):
        adv.process([[0.5]], 1, mode="end", variant="authors", overlong_last_scores=[0.1, 0.2])


# ---------------------------------------------------------------- spreading to tokens


def test_spread_to_tokens_span_objects_and_tuples_agree():
    # Segments [0, 2), [2, 5), [5, 6) get A = [1, −2, 3]; tokens 6..7 are padding → 0.
    want = [1, 1, -2, -2, -2, 3, 0, 0]
    spans = [Span("ab", 0, 2), Span("cde", 2, 5), Span("f", 5, 6)]
    np.testing.assert_array_equal(adv.spread_to_tokens([1, -2, 3], spans, 6, 8), want)
    np.testing.assert_array_equal(adv.spread_to_tokens([1, -2, 3], [(0, 2), (2, 5), (5, 6)], 6, 8), want)


@pytest.mark.parametrize(
    "spans, message",
    [
        ([(0, 2), (1, 4)], r"rollout 3, span 1 \[1, 4\)"),  # overlap
        ([(0, 2), (3, 4)], r"rollout 3, span 1 \[3, 4\)"),  # gap: token 2 would get no advantage
        ([(1, 2), (2, 4)], r"rollout 3, span 0 \[1, 2\)"),  # does not start at 0
        ([(0, 2), (2, 5)], r"rollout 3, span 1 \[2, 5\)"),  # past the response length 4
        ([(0, 2), (2, 2)], r"rollout 3, span 1 \[2, 2\)"),  # empty span
        ([(2, 4), (0, 2)], r"rollout 3, span 0 \[2, 4\)"),  # unsorted
        ([(0, 1), (1, 3)], r"rollout 3: spans cover \[0, 3\) but the response has 4 tokens"),
    ],
)
def test_spread_to_tokens_rejects_bad_spans(spans, message):
    with pytest.raises(ValueError, match=message):
        adv.spread_to_tokens([0.1, 0.2], spans, 4, 6, row=3)


def test_spread_to_tokens_count_and_length_errors():
    with pytest.raises(ValueError, match="segment advantages for 1 spans"):
        adv.spread_to_tokens([0.1, 0.2], [(0, 4)], 4, 6)
    with pytest.raises(ValueError, match=r"length 7 outside \[0, T=6\]"):
        adv.spread_to_tokens([0.1], [(0, 7)], 7, 6)


def test_spread_batch_masks_unscored_rows():
    # Row 0: [0, 1) → 0.5, [1, 3) → −0.5. Row 1 unscored → zeros, mask False. Row 2: [0, 4) → 2.
    got, mask = adv.spread_batch(
        [[0.5, -0.5], None, [2.0]], [[(0, 1), (1, 3)], None, [Span("x", 0, 4)]], [3, 0, 4], 4
    )
    np.testing.assert_array_equal(got, [[0.5, -0.5, -0.5, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
    np.testing.assert_array_equal(mask, [True, False, True])
    assert got.dtype == np.float32


def test_spread_batch_errors_name_the_rollout():
    with pytest.raises(ValueError, match=r"rollout 1: spans cover \[0, 2\) but the response has 3 tokens"):
        adv.spread_batch([[1.0], [1.0]], [[(0, 3)], [(0, 2)]], [3, 3], 4)
    with pytest.raises(ValueError, match=r"rollout 1, span 0 \[0, 4\)"):
        adv.spread_batch([[1.0], [1.0]], [[(0, 3)], [(0, 4)]], [3, 3], 4)
    with pytest.raises(ValueError, match="rollout 0: has segment advantages but no spans"):
        adv.spread_batch([[1.0]], [None], [3], 4)
    with pytest.raises(ValueError, match="2 advantages, 1 span lists"):
        adv.spread_batch([None, None], [None], [0, 0], 4)


def test_process_then_spread_end_to_end():
    # DeltaNorm of s = [0.0, 1.0]: A = [0 − 1, 1 − 0] = [−1, 1] over spans [0, 2) and [2, 3).
    (a,) = adv.process([[0.0, 1.0]], 1)
    got, mask = adv.spread_batch([a], [[(0, 2), (2, 3)]], [3], 5)
    np.testing.assert_array_equal(got, [[-1, -1, 1, 0, 0]])
    assert mask.tolist() == [True]


# ---------------------------------------------------------------- segment stats


def test_segment_stats():
    # Counts [1, 3, 1, 0, 5]: mean 10/5 = 2.0; exactly-one share 2/5 = 0.4; max 5.
    got = adv.segment_stats([1, 3, 1, 0, 5])
    assert got == {"segments/mean": 2.0, "segments/single_frac": 0.4, "segments/max": 5.0}


def test_segment_stats_errors():
    with pytest.raises(ValueError, match="non-empty"):
        adv.segment_stats([])
    with pytest.raises(ValueError, match="non-negative ints"):
        adv.segment_stats([1, -1])
    with pytest.raises(ValueError, match="non-negative ints"):
        adv.segment_stats([1.5, 2.0])
