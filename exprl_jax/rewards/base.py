"""The reward-function interface between the host-side RL loop and whatever scores rollouts.

A reward function is called on the host with one step's batch (problems, references, decoded responses and
segment token spans) and returns per-rollout scores (Outcome / sparse) or per-segment scores (Process), plus a
valid mask. An unscored rollout (judge failure, unparseable answer) is `valid=False` with a reason; it is never
turned into a score of 0 (SPEC §3).
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Protocol, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Span:
    """A segment of a response: text plus its half-open token span [start, end) in the response tokens."""

    text: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """One step's rollouts, prompt-major (row i belongs to prompt i // group_size)."""

    problems: Sequence[str]  # [N] the bare problem text of each rollout's prompt
    references: Sequence[str]  # [N] hidden reference solutions (never shown to the policy)
    answers: Sequence[str]  # [N] reference final answers
    responses: Sequence[str]  # [N] decoded responses
    truncated: np.ndarray  # [N] bool: hit the generation limit (SPEC §4 "Overlong")
    group_size: int
    segments: Sequence[Sequence[Span]] | None = None  # [N][S_i] for Process rewards
    domains: Sequence[str | None] | None = None  # [N] each record's domain (picks the judge template)

    def __post_init__(self):
        n = len(self.responses)
        for name in ("problems", "references", "answers"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RewardBatch.{name} has {len(getattr(self, name))} rows, responses has {n}")
        if np.shape(self.truncated) != (n,):
            raise ValueError(f"RewardBatch.truncated has shape {np.shape(self.truncated)}, expected ({n},)")
        for name in ("segments", "domains"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"RewardBatch.{name} has {len(getattr(self, name))} rows, responses has {n}")


@dataclasses.dataclass
class RewardResult:
    """Scores for one RewardBatch.

    Exactly one of `scores` (Outcome: [N] float in [0, 1]) and `segment_scores` (Process: [N] list of [S_i]
    arrays) is set. Rows with `valid[i] == False` are unscored: their score entry is NaN / None and `reasons[i]`
    says why. `metrics` are scalars the caller logs (e.g. `judge/latency_p50_s`).
    """

    valid: np.ndarray  # [N] bool
    scores: np.ndarray | None = None  # [N] float, NaN where unscored
    segment_scores: list[np.ndarray | None] | None = None  # [N] of [S_i] float, None where unscored
    reasons: list[str | None] = dataclasses.field(default_factory=list)  # [N] why a row is unscored
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # [N] Process, judge_overlong only: the judge's reward for an Overlong rollout's last segment (its segment
    # scores stay all-zero); NaN elsewhere. The authors' EndNorm subtracts it (advantages.process).
    overlong_last_scores: np.ndarray | None = None

    def __post_init__(self):
        if (self.scores is None) == (self.segment_scores is None):
            raise ValueError("RewardResult needs exactly one of scores / segment_scores")
        n = len(self.valid)
        if not self.reasons:
            self.reasons = [None] * n
        if len(self.reasons) != n:
            raise ValueError(f"RewardResult.reasons has {len(self.reasons)} rows, valid has {n}")


class RewardFn(Protocol):
    """Anything that scores a RewardBatch. `kind` is "outcome" or "process"."""

    kind: str

    async def score(self, batch: RewardBatch) -> RewardResult: ...


def score_sync(fn: RewardFn, batch: RewardBatch) -> RewardResult:
    """Runs an async reward function to completion from synchronous host code."""
    return asyncio.run(fn.score(batch))
