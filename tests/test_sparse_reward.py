"""SparseReward (SPEC §4 "Sparse", "Overlong") on a literal batch, and no_correct_frac on literal groups."""
import math

import numpy as np
import pytest

from exprl_jax.rewards import RewardBatch, SparseReward, no_correct_frac, score_sync

HANG = r"10^{10^{8}}"  # sympy computes this integer exactly: far past any deadline


def make_batch(responses, answers, truncated, group_size):
    n = len(responses)
    return RewardBatch(
        problems=["p"] * n,
        references=["ref"] * n,
        answers=answers,
        responses=responses,
        truncated=np.array(truncated, dtype=bool),
        group_size=group_size,
    )


def test_literal_batch():
    batch = make_batch(
        responses=[
            r"half: $\boxed{\frac{1}{2}}$",  # 0: correct, in another form than the reference
            r"\boxed{3}",  # 1: wrong
            "I think it is 4",  # 2: no boxed answer
            r"\boxed{4}",  # 3: correct but truncated -> 0 (Overlong)
            rf"\boxed{{{HANG}}}",  # 4: the checker times out -> unscored
            r"\boxed{7} ... \boxed{7.0}",  # 5: correct
        ],
        answers=["0.5", "0.5", "4", "4", "7", "7"],
        truncated=[False, False, False, True, False, False],
        group_size=2,
    )
    fn = SparseReward(timeout_s=1.0)
    assert fn.kind == "outcome"
    result = score_sync(fn, batch)
    assert result.segment_scores is None
    np.testing.assert_array_equal(result.valid, [True, True, True, True, False, True])
    np.testing.assert_array_equal(result.scores, [1.0, 0.0, 0.0, 0.0, np.nan, 1.0])
    assert result.reasons == [None, None, None, None, "timeout", None]
    assert result.metrics == {
        "reward/sparse_acc": pytest.approx(2 / 5),  # over the 5 scored rows; 2/6 if the NaN row counted as 0
        "reward/no_answer_frac": pytest.approx(1 / 6),
        "reward/checker_timeouts": 1.0,
        "reward/checker_errors": 0.0,
        "reward/no_correct_frac": pytest.approx(1 / 3),  # group (2, 3) has no correct sample
    }


def test_truncated_rows_are_not_checked():
    # A truncated row with a pathological answer scores 0 at once: it never reaches the checker.
    batch = make_batch([rf"\boxed{{{HANG}}}", r"\boxed{2}"], ["1", "2"], [True, False], group_size=2)
    result = score_sync(SparseReward(timeout_s=30.0), batch)
    np.testing.assert_array_equal(result.valid, [True, True])
    np.testing.assert_array_equal(result.scores, [0.0, 1.0])
    assert result.metrics["reward/checker_timeouts"] == 0.0


def test_gsm8k_style_and_unparseable_reference():
    batch = make_batch(["so #### 1,234", "#### 12", r"\boxed{1}"], ["1234", "13", ""], [False] * 3, group_size=1)
    result = score_sync(SparseReward(style="auto"), batch)
    np.testing.assert_array_equal(result.scores, [1.0, 0.0, np.nan])
    assert result.reasons == [None, None, "gold_parse_error"]  # a broken reference is not the policy's 0
    assert result.metrics["reward/checker_errors"] == 1.0
    assert result.metrics["reward/no_correct_frac"] == pytest.approx(1 / 2)


def test_unknown_style_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown answer style"):
        SparseReward(style="last_number")


@pytest.mark.parametrize(
    "correct, group_size, want",
    [
        ([1, 0, 0, 0, 0, 1], 2, 1 / 3),  # groups (1,0) (0,0) (0,1); share of wrong SAMPLES would be 4/6
        ([1, 0, 0, 0], 2, 0.5),
        ([True, True, True, False, False, False], 3, 0.5),
        ([0, 0, 0, 0], 4, 1.0),
        ([1, 1, 1, 1], 1, 0.0),
        ([np.nan, np.nan, 0, 1], 2, 0.0),  # a group with no scored row is left out
        ([np.nan, 0, 0, 1], 2, 0.5),  # a group with a scored wrong row and an unscored one: no correct sample
    ],
)
def test_no_correct_frac(correct, group_size, want):
    assert no_correct_frac(correct, group_size) == pytest.approx(want)


def test_no_correct_frac_edge_cases():
    assert math.isnan(no_correct_frac([np.nan, np.nan], 2))
    with pytest.raises(ValueError, match="groups of 4"):
        no_correct_frac([1, 0, 1], 4)
    with pytest.raises(ValueError, match="0/1"):
        no_correct_frac([0.5, 1.0], 2)


def test_answer_verdicts_marks_checker_failures_as_no_verdict():
    from exprl_jax.rewards.sparse import answer_verdicts

    verdicts, reasons = answer_verdicts([r"\boxed{4}", rf"\boxed{{{HANG}}}", r"\boxed{5}", r"\boxed{4}"],
                                        ["4", "7", "4", "4"], [False, False, False, True], timeout_s=1.0)
    assert verdicts[0] == 1.0 and math.isnan(verdicts[1]) and verdicts[2] == 0.0 and verdicts[3] == 0.0
    assert reasons == [None, "timeout", None, None]


@pytest.mark.parametrize("method", ["grpo", "exprl_outcome"])
def test_training_checks_answers_once_per_step_and_counts_no_verdicts(tmp_path, monkeypatch, method):
    """The sparse reward is the answer check itself (one check per step, not two); a checker timeout is a
    no-verdict: out of the accuracy and, under the sparse reward, out of the loss, and counted."""
    from conftest import smoke_config

    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics
    from exprl_jax.rewards import answers, sparse

    calls = []

    def fake_check(preds, golds, **kw):  # every other checked rollout times out (truncated ones are not checked)
        calls.append(len(range(0, len(preds), 2)))
        return [answers.AnswerCheck(False, p, "timeout") if i % 2 == 0 else answers.AnswerCheck(False, p, "no_answer")
                for i, p in enumerate(preds)]

    monkeypatch.setattr(sparse, "check_answers", fake_check)
    cfg = smoke_config(**{"method": method, "train.steps": 2, "eval.at_start": False, "eval.at_end": False})
    Experiment(cfg, str(tmp_path)).run()
    assert len(calls) == 2  # one answer check per step
    assert sum(calls) > 0  # some rollout was checked (a step whose rollouts are all truncated checks none)
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["step"] > 0]
    for row, timeouts in zip(rows, calls):
        assert row["reward/sparse_no_verdict"] == timeouts
        assert row["reward/sparse_acc"] == 0.0
        if method == "grpo":  # out of the loss: unscored
            assert row["reward/unscored_frac"] == pytest.approx(timeouts / 16)
            assert row["reward/checker_timeouts"] == timeouts
