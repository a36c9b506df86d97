"""The positive control's reward: an exact per-step score from the reference's checkpoints, no Likert scale.

Step t of a response earns 1 when the response through step t is clean (no contradicted checkpoint, no different
answer) and step t adds a checkpoint without a gap; the last step earns 1 only for the exact trace (every
checkpoint and the answer), so stopping early is not rewarded (`judge.programmatic.exact_step_scores`). Used with
exprl_process and a GroupNorm advantage, it shows what a perfectly informed dense reward can do in the budget.
"""
from __future__ import annotations

import numpy as np

from exprl_jax.judge.programmatic import checkpoints_of, exact_step_scores
from exprl_jax.rewards.answers import extract_answer
from exprl_jax.rewards.base import RewardBatch, RewardResult


class ExactStepReward:
    kind = "process"

    def __init__(self, records=()):
        # records that carry their checkpoints are graded on them; others on the `name=value` lines of the reference
        self.checkpoints = {r.reference: checkpoints_of("\n".join(r.checkpoints)) for r in records if r.checkpoints}

    async def score(self, batch: RewardBatch) -> RewardResult:
        if batch.segments is None:
            raise ValueError("the exact per-step reward needs batch.segments (exprl_process)")
        n = len(batch.responses)
        scores: list[np.ndarray | None] = [None] * n
        reasons: list[str | None] = [None] * n
        for i, (reference, segments) in enumerate(zip(batch.references, batch.segments)):
            if batch.truncated[i]:
                scores[i] = np.zeros(len(segments))  # SPEC §4 Overlong: all-zero segment rewards
            elif not segments:
                reasons[i] = "no_segments"
            else:
                cps = self.checkpoints.get(reference) or checkpoints_of(reference)
                scores[i] = np.array(exact_step_scores([s.text for s in segments], cps,
                                                       extract_answer(reference, style="boxed")))
        valid = np.array([s is not None for s in scores], dtype=bool)
        means = [float(s.mean()) for s in scores if s is not None and len(s)]
        metrics = {"reward/mean": float(np.mean(means)) if means else float("nan"),
                   "reward/unscored_frac": float(1.0 - valid.mean()) if n else 0.0}
        return RewardResult(valid=valid, segment_scores=scores, reasons=reasons, metrics=metrics)
