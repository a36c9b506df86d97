"""The sparse outcome reward (SPEC §4 "Sparse"): 1 when the response's final answer is equivalent to the
reference answer, else 0. Stage I logs it as a metric; Stage II and the sparse-GRPO baseline train on it.
"""
from __future__ import annotations

import asyncio

import numpy as np

from exprl_jax.rewards.answers import check_answers, extract_answer
from exprl_jax.rewards.base import RewardBatch, RewardResult


def no_correct_frac(correct_N, group_size: int) -> float:
    """Share of prompts (groups of `group_size` consecutive rows) with no correct sample (SPEC §4, §7).

    correct_N: [N] bool, or floats in {0, 1} with NaN for unscored rows. NaN rows are ignored; a group with no
    scored row is left out of the denominator; NaN when no group has a scored row.
    """
    c = np.asarray(correct_N, dtype=np.float64)
    if c.ndim != 1 or group_size < 1 or c.shape[0] % group_size:
        raise ValueError(f"correct_N of shape {c.shape} does not split into groups of {group_size}")
    scored = ~np.isnan(c)
    if np.any((c[scored] != 0) & (c[scored] != 1)):
        raise ValueError("correct_N must hold 0/1 (or bool), with NaN only for unscored rows")
    c_BG, scored_BG = c.reshape(-1, group_size), scored.reshape(-1, group_size)
    has_scored_B = scored_BG.any(axis=1)
    if not has_scored_B.any():
        return float("nan")
    any_correct_B = (np.nan_to_num(c_BG) > 0).any(axis=1)
    return float(np.mean(~any_correct_B[has_scored_B]))


def answer_verdicts(responses, answers, truncated, *, style: str = "boxed", timeout_s: float = 5.0,
                    max_workers: int = 2) -> tuple[np.ndarray, list[str | None]]:
    """The final-answer check of SPEC §4, once per rollout: [N] float, 1 right, 0 wrong (a truncated rollout is 0
    without a check, SPEC §4 "Overlong"), NaN where the checker itself failed (timeout, dead worker, unreadable
    gold): no verdict, to be excluded and counted, never read as wrong. Also the reasons ([N], None when judged)."""
    truncated = np.asarray(truncated, dtype=bool)
    n = len(responses)
    if truncated.shape != (n,) or len(answers) != n:
        raise ValueError(f"{n} responses, {len(answers)} answers, truncated of shape {truncated.shape}")
    todo = [i for i in range(n) if not truncated[i]]
    checks = check_answers([extract_answer(responses[i], style=style) for i in todo], [answers[i] for i in todo],
                           timeout_s=timeout_s, max_workers=max_workers)
    verdicts, reasons = np.zeros(n, dtype=np.float64), [None] * n
    for i, check in zip(todo, checks):
        if check.checker_failed:
            verdicts[i], reasons[i] = np.nan, check.reason
        else:
            verdicts[i] = float(check.correct)
    return verdicts, reasons


class SparseReward:
    """Binary answer-equivalence reward, one score per rollout (kind "outcome").

    Row i scores 1.0 when extract_answer(responses[i]) is equivalent to answers[i] (math_verify), else 0.0.
    A truncated rollout scores 0.0 without a check (SPEC §4 "Overlong"). A wrong, unparseable or missing
    answer is a legitimate 0.0 and the row stays valid: the policy is accountable for it. Only a failure of
    the checker itself leaves a row unscored (valid False, score NaN, reason kept): "timeout" (the check ran
    past `timeout_s`), "worker_error" (the checking process died) and "gold_parse_error" (the reference answer
    itself could not be read).
    """

    kind = "outcome"

    def __init__(self, *, style: str = "boxed", timeout_s: float = 5.0, max_workers: int = 2):
        extract_answer("", style=style)  # rejects an unknown style now rather than at the first batch
        self.style, self.timeout_s, self.max_workers = style, timeout_s, max_workers

    async def score(self, batch: RewardBatch) -> RewardResult:
        n = len(batch.responses)
        preds = [extract_answer(r, style=self.style) for r in batch.responses]
        scores, reasons = await asyncio.to_thread(
            answer_verdicts, batch.responses, batch.answers, batch.truncated, style=self.style,
            timeout_s=self.timeout_s, max_workers=self.max_workers)
        valid = ~np.isnan(scores)
        timeouts = sum(r == "timeout" for r in reasons)
        metrics = {
            "reward/sparse_acc": float(np.mean(scores[valid])) if valid.any() else float("nan"),
            "reward/no_answer_frac": float(np.mean([p is None or not p.strip() for p in preds])) if n else 0.0,
            "reward/checker_timeouts": float(timeouts),
            "reward/checker_errors": float(int((~valid).sum()) - timeouts),
            "reward/no_correct_frac": no_correct_frac(scores, batch.group_size),
        }
        return RewardResult(valid=valid, scores=scores, reasons=reasons, metrics=metrics)
