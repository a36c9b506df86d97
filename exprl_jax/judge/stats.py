"""Per-step judge metrics: latency percentiles, retries, unscored fractions by reason, cache hits and token use.

`record` one judged item at a time, read `metrics()` at the end of the step, then `reset()`.
"""
from __future__ import annotations

import collections

import numpy as np

from exprl_jax.judge.backend import Completion


class JudgeStats:
    """Latency, retries and tokens count only calls that reached the server (not cache hits).

    With no such call the latency percentiles are NaN: there is no latency to report, and 0 would be a lie.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._calls = 0
        self._cache_hits = 0
        self._latencies_s: list[float] = []
        self._retries = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._unscored: collections.Counter = collections.Counter()

    def record(self, completion: Completion, cached: bool, unscored_reason: str | None = None) -> None:
        """One judged item. `unscored_reason` says why it got no score (e.g. a parse failure); when the call
        itself failed (text None) and no reason is given, the completion's own reason is used."""
        self._calls += 1
        if unscored_reason is None and completion.text is None:
            unscored_reason = completion.reason or "no_text"
        if unscored_reason is not None:
            self._unscored[unscored_reason] += 1
        if cached:
            self._cache_hits += 1
            return
        self._latencies_s.append(completion.latency_s)
        self._retries += completion.retries
        self._prompt_tokens += completion.prompt_tokens
        self._completion_tokens += completion.completion_tokens

    def metrics(self) -> dict[str, float]:
        calls = self._calls
        if self._latencies_s:
            p50, p95 = (float(p) for p in np.percentile(self._latencies_s, [50, 95]))
        else:
            p50 = p95 = float("nan")
        metrics = {
            "judge/latency_p50_s": p50,
            "judge/latency_p95_s": p95,
            "judge/retries": self._retries,
            "judge/unscored_frac": sum(self._unscored.values()) / calls if calls else 0.0,
            "judge/cache_hit_frac": self._cache_hits / calls if calls else 0.0,
            "judge/prompt_tokens": self._prompt_tokens,
            "judge/completion_tokens": self._completion_tokens,
            "judge/calls": calls,
        }
        for reason, count in sorted(self._unscored.items()):
            metrics[f"judge/unscored/{reason}"] = count
        return metrics
