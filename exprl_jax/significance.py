"""Is an arm's difference real? Paired bootstrap confidence intervals over problems x seeds, and the minimum
detectable effect (MDE) of a comparison, computed from the base model's evaluation before any arm runs.

Both work on per-problem pass@k estimates: `counts` arrays [S seeds, P problems] of correct samples out of n.
"""
from __future__ import annotations

import math

import numpy as np

from exprl_jax.evaluate import pass_at_k

Z_95, Z_80 = 1.959964, 0.841621  # two-sided 5% test; 80% power


def per_problem_pass_at_k(correct_SP, samples_SP, k: int) -> np.ndarray:
    """[S, P] unbiased pass@k of every (seed, problem) cell; NaN where the cell has fewer than k samples."""
    correct_SP, samples_SP = np.asarray(correct_SP, dtype=int), np.asarray(samples_SP, dtype=int)
    out = np.full(correct_SP.shape, np.nan)
    for idx in np.ndindex(correct_SP.shape):
        if samples_SP[idx] >= k:
            out[idx] = pass_at_k(int(samples_SP[idx]), int(correct_SP[idx]), k)
    return out


def paired_bootstrap(a_SP, b_SP, *, num_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean difference a - b over (seed, problem) cells with its bootstrap CI. Each resample draws seeds with
    replacement, then problems with replacement, the same draw for both arms (paired: the same problems and
    evaluation seeds). Cells NaN in either arm are left out. Returns {diff, low, high, significant}."""
    a_SP, b_SP = np.atleast_2d(np.asarray(a_SP, dtype=float)), np.atleast_2d(np.asarray(b_SP, dtype=float))
    if a_SP.shape != b_SP.shape:
        raise ValueError(f"paired arms need the same (seeds, problems) shape, got {a_SP.shape} and {b_SP.shape}")
    d_SP = a_SP - b_SP
    if not np.isfinite(d_SP).any():
        return {"diff": math.nan, "low": math.nan, "high": math.nan, "significant": False}
    S, P = d_SP.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(S, size=(num_resamples, S))
    problems = rng.integers(P, size=(num_resamples, P))
    draws = np.array([np.nanmean(d_SP[np.ix_(s, p)]) for s, p in zip(seeds, problems)])
    low, high = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(np.nanmean(d_SP)), "low": float(low), "high": float(high),
            "significant": bool(low > 0 or high < 0)}


def mde(base_rates, *, samples: int, k: int = 1, seeds: int = 1, num_sims: int = 400, seed: int = 0) -> float:
    """The minimum detectable effect of a paired comparison of two arms on these problems: (z_0.975 + z_0.8) x the
    standard deviation of the mean pass@k difference when both arms equal the base (`base_rates`: per-problem
    success probabilities), simulated from binomial sampling of `samples` per problem in each of `seeds` seeds.
    Training-seed variance is not included: this is the floor set by the evaluation alone."""
    rates = np.clip(np.asarray(base_rates, dtype=float), 0.0, 1.0)
    rng = np.random.default_rng(seed)
    table = np.array([[pass_at_k(samples, c, k) for c in range(samples + 1)]])[0]  # pass@k by correct count
    diffs = []
    for _ in range(num_sims):
        a = table[rng.binomial(samples, rates, size=(seeds, len(rates)))]
        b = table[rng.binomial(samples, rates, size=(seeds, len(rates)))]
        diffs.append(float(np.mean(a - b)))
    return (Z_95 + Z_80) * float(np.std(diffs))


def mde_resampled(per_sample_P, *, seeds: int = 1, num_sims: int = 400, seed: int = 0) -> float:
    """As `mde`, for a per-problem mean of per-sample values (e.g. the share of late chain positions reached):
    each arm's per-problem mean is re-drawn by resampling that problem's base samples with replacement."""
    rng = np.random.default_rng(seed)
    per_sample_P = [np.asarray(v, dtype=float) for v in per_sample_P if len(v)]
    diffs = []
    for _ in range(num_sims):
        total = 0.0
        for values in per_sample_P:
            a, b = (rng.choice(values, size=(seeds, len(values))).mean(axis=1) for _ in range(2))
            total += float(np.mean(a - b))
        diffs.append(total / len(per_sample_P))
    return (Z_95 + Z_80) * float(np.std(diffs))


def format_ci(result: dict, digits: int = 3) -> str:
    """`+0.012 [-0.004, +0.028] n.s.`: the difference, its CI, and "n.s." where the CI covers 0."""
    if not np.isfinite(result["diff"]):
        return "n/a"
    cell = f"{result['diff']:+.{digits}f} [{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]"
    return cell if result["significant"] else cell + " n.s."
