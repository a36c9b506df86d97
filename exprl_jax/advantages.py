"""Host-side advantage computation from judge scores (SPEC §4), in plain numpy.

Outcome / sparse rewards get GRPO group-normalised advantages per rollout; Process rewards get per-segment
advantages (DeltaNorm / EndNorm / GroupNorm) that are then spread over each segment's tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

PROCESS_MODES = ("delta", "end", "group")
SINGLE_SEGMENT_RULES = ("zero", "score")
# "paper": SPEC §4's formulas (the default). "authors": what the authors' verl fork computes, where it differs
# (SPEC §4 "Where the paper and the authors' code differ"; WORKSPACE.md has the table).
VARIANTS = ("paper", "authors")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def _check_group_layout(num_rows: int, group_size: int) -> int:
    """Returns the number of groups B for N = num_rows prompt-major rows of `group_size` each."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if num_rows % group_size:
        raise ValueError(f"{num_rows} rows do not split into groups of group_size={group_size}")
    return num_rows // group_size


def grpo(
    rewards: Any,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    valid: Any = None,
    variant: str = "paper",
) -> np.ndarray:
    """GRPO advantages A = (r − mean_group) / (std_group + eps), one per rollout (SPEC §4, §5 Stage II).

    Rows are prompt-major: row i belongs to group i // group_size. The std is the sample std (ddof=1), as in
    the authors' code. `scale_by_std=False` gives r − mean_group (Dr.GRPO, SPEC §5 Stage II). `valid` ([N] bool)
    marks scored rows: unscored rows are left out of the group's mean and std and get advantage 0; a group with
    fewer than 2 scored rows gives 0 to all its rows (no baseline to compare against). A NaN or infinite reward
    in a scored row raises: a failed score is never turned into a number. Returns float64 [N].

    variant="authors" is the authors' code: every row of a group enters its mean and std, an unscored row as
    reward 0 (the code keeps a zero reward for it and only masks its loss), and a group of one row has mean 0 and
    std 1, so A = r / (1 + eps) (r without std) instead of 0. Unscored rows still get advantage 0 here.
    """
    _check_variant(variant)
    rewards_N = np.asarray(rewards, dtype=np.float64)
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards_N.shape}")
    num_groups = _check_group_layout(rewards_N.shape[0], group_size)
    if valid is None:
        valid_N = np.ones(rewards_N.shape, dtype=bool)
    else:
        valid_N = np.asarray(valid)
        if valid_N.dtype != np.bool_ or valid_N.shape != rewards_N.shape:
            raise ValueError(
                f"valid must be a bool array of shape {rewards_N.shape}, got {valid_N.dtype} {valid_N.shape}"
            )
    bad_rows = np.flatnonzero(valid_N & ~np.isfinite(rewards_N))
    if bad_rows.size:
        raise ValueError(
            f"non-finite reward in valid rows {bad_rows.tolist()}: mark unscored rows valid=False instead"
        )

    valid_BG = valid_N.reshape(num_groups, group_size)
    rewards_BG = np.where(valid_BG, rewards_N.reshape(num_groups, group_size), 0.0)
    if variant == "authors":
        if group_size == 1:  # the code's group of one: mean 0, std 1
            advantages_BG = rewards_BG / (1.0 + eps) if scale_by_std else rewards_BG
        else:  # an unscored row counts as reward 0 in the statistics (already 0 in rewards_BG)
            centered_BG = rewards_BG - rewards_BG.mean(axis=1, keepdims=True)
            std_B1 = rewards_BG.std(axis=1, ddof=1, keepdims=True)
            advantages_BG = centered_BG / (std_B1 + eps) if scale_by_std else centered_BG
        return np.where(valid_BG, advantages_BG, 0.0).reshape(-1)
    count_B1 = valid_BG.sum(axis=1, keepdims=True)
    mean_B1 = rewards_BG.sum(axis=1, keepdims=True) / np.maximum(count_B1, 1)
    centered_BG = np.where(valid_BG, rewards_BG - mean_B1, 0.0)
    if scale_by_std:
        var_B1 = (centered_BG**2).sum(axis=1, keepdims=True) / np.maximum(count_B1 - 1, 1)
        centered_BG = centered_BG / (np.sqrt(var_B1) + eps)
    advantages_BG = np.where(count_B1 >= 2, centered_BG, 0.0)
    return advantages_BG.reshape(-1)


def _check_segment_scores(row: int, scores: Any) -> np.ndarray:
    scores_S = np.asarray(scores, dtype=np.float64)
    if scores_S.ndim != 1:
        raise ValueError(f"rollout {row}: segment scores must be 1-D, got shape {scores_S.shape}")
    if scores_S.size == 0:
        raise ValueError(f"rollout {row}: empty segment scores (T=0); mark the rollout unscored (None) instead")
    if not np.isfinite(scores_S).all():
        raise ValueError(f"rollout {row}: non-finite segment score in {scores_S.tolist()}")
    return scores_S


def process(
    segment_scores: Sequence[Any],
    group_size: int,
    *,
    mode: str = "delta",
    single_segment: str = "zero",
    variant: str = "paper",
    spans: Sequence[Sequence[Any] | None] | None = None,
    padded_length: int | None = None,
    overlong_last_scores: Any = None,
) -> list[np.ndarray | None]:
    """Per-segment advantages A_1..A_T for ExpRL-Process (SPEC §4), with no group normalisation.

    `segment_scores` is prompt-major, length N: a 1-D array s_1..s_T per rollout (T varies), or None for an
    unscored rollout, which gets None back. An Overlong rollout arrives with all-zero scores (SPEC §4). Modes:
      "delta" (DeltaNorm): A_t = s_t − s_{t−1} for t > 1, A_1 = s_1 − s_T.
      "end"   (EndNorm):   A_t = s_t − s_T for t < T, A_T = s_T.
      "group" (GroupNorm): A_t = s_t − mean over the group's scored rollouts of each rollout's mean score.
    T = 1: in "delta" mode the formula gives s_1 − s_1 = 0 ("zero"); the authors' code gives +s_1 ("score");
    `single_segment` picks one and applies to "delta" only. "end" follows its own formula, A_1 = s_1;
    "group" follows its formula, A_1 = s_1 − group baseline. A group with one scored rollout uses that
    rollout's own mean as the baseline. Returns float64 arrays.

    variant="authors" reproduces the authors' code ("delta" is the same in both):
      "end":   A_t = s_t − s_T for every t, so A_T = 0 and T = 1 gives 0. For an Overlong rollout the code
               zeroes the rewards but still subtracts the judge's s_T of its last segment: pass those as
               `overlong_last_scores` ([N], NaN elsewhere) and every token gets −s_T.
      "group": baseline b = (1/G) Σ_j (Σ_t n_jt s_jt / n_j) / L over all G rollouts of the group: each rollout's
               token-weighted mean score (n_jt tokens in segment t, n_j in the response) divided by the padded
               response length L, with an unscored rollout counted as 0. Needs `spans` (each rollout's segment
               token spans, as spread_to_tokens takes them) and `padded_length` L.
    """
    if mode not in PROCESS_MODES:
        raise ValueError(f"unknown process advantage mode {mode!r}; expected one of {PROCESS_MODES}")
    if single_segment not in SINGLE_SEGMENT_RULES:
        raise ValueError(f"unknown single_segment rule {single_segment!r}; expected one of {SINGLE_SEGMENT_RULES}")
    _check_variant(variant)
    num_groups = _check_group_layout(len(segment_scores), group_size)
    scores = [None if s is None else _check_segment_scores(i, s) for i, s in enumerate(segment_scores)]

    if mode == "group":
        if variant == "authors":
            baselines = _authors_group_baselines(scores, group_size, spans, padded_length)
        else:
            baselines = []
            for b in range(num_groups):
                means = [s.mean() for s in scores[b * group_size : (b + 1) * group_size] if s is not None]
                baselines.append(float(np.mean(means)) if means else None)
        return [None if s is None else s - baselines[i // group_size] for i, s in enumerate(scores)]

    if mode == "end" and variant == "authors":
        last_N = [np.nan if s is None else s[-1] for s in scores]
        if overlong_last_scores is not None:
            overlong_N = np.asarray(overlong_last_scores, dtype=np.float64)
            if overlong_N.shape != (len(scores),):
                raise ValueError(f"overlong_last_scores has shape {overlong_N.shape}, expected ({len(scores)},)")
            last_N = np.where(np.isfinite(overlong_N), overlong_N, last_N)
        return [None if s is None else s - last_N[i] for i, s in enumerate(scores)]

    advantages: list[np.ndarray | None] = []
    for s in scores:
        if s is None:
            advantages.append(None)
        elif mode == "delta":
            if s.size == 1 and single_segment == "score":
                advantages.append(s.copy())
            else:
                # np.roll puts s_T in front of s_1, so A_1 = s_1 − s_T and A_t = s_t − s_{t−1}; T = 1 gives 0.
                advantages.append(s - np.roll(s, 1))
        else:  # "end"
            a = s - s[-1]
            a[-1] = s[-1]
            advantages.append(a)
    return advantages


def _authors_group_baselines(scores: list[np.ndarray | None], group_size: int, spans: Any,
                             padded_length: int | None) -> list[float]:
    """The authors' GroupNorm baseline per group (see `process`). The code averages the per-position vector
    s_jt·m_jt / n_j over all G·L entries of the group; its + 1e-8 on n_j is below fp32 resolution and left out."""
    if spans is None or padded_length is None:
        raise ValueError("the authors' GroupNorm needs each rollout's segment token spans (spans=) and the padded "
                         "response length L (padded_length=)")
    if len(spans) != len(scores):
        raise ValueError(f"{len(spans)} span lists for {len(scores)} rollouts")
    if isinstance(padded_length, bool) or not isinstance(padded_length, (int, np.integer)) or padded_length < 1:
        raise ValueError(f"padded_length must be a positive int, got {padded_length!r}")
    weighted_N = np.zeros(len(scores))  # Σ_t n_jt s_jt / n_j / L; 0 for an unscored rollout
    for j, s in enumerate(scores):
        if s is None:
            continue
        if spans[j] is None or len(spans[j]) != s.size:
            raise ValueError(f"rollout {j}: {s.size} segment scores but "
                             f"{'no' if spans[j] is None else len(spans[j])} spans")
        counts_S = np.array([end - start for start, end in map(_span_bounds, spans[j])], dtype=np.float64)
        if (counts_S < 1).any() or counts_S.sum() > padded_length:
            raise ValueError(f"rollout {j}: span lengths {counts_S.tolist()} do not fit in L={padded_length}")
        weighted_N[j] = (counts_S * s).sum() / counts_S.sum() / padded_length
    return weighted_N.reshape(-1, group_size).mean(axis=1).tolist()


def _span_bounds(span: Any) -> tuple[int, int]:
    """(start, end) of a `rewards.base.Span`-like object or a (start, end) tuple."""
    if hasattr(span, "start") and hasattr(span, "end"):
        start, end = span.start, span.end
    else:
        start, end = span
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (start, end)):
        raise ValueError(f"span bounds must be ints, got ({start!r}, {end!r})")
    return int(start), int(end)


def spread_to_tokens(
    segment_advantages: Any, spans: Sequence[Any], length: int, T: int, *, row: int | None = None
) -> np.ndarray:
    """Token advantages [T]: every token of segment t (tokens [start_t, end_t)) gets A_t (SPEC §4).

    Spans are `.start`/`.end` objects or (start, end) tuples. They must be non-empty, sorted, contiguous and
    cover [0, length) exactly, so no scored token is dropped and none is counted twice; tokens from `length`
    to T (padding) get 0. `row` only labels error messages. Returns float32 [T].
    """
    where = "rollout" if row is None else f"rollout {row}"
    advantages_S = np.asarray(segment_advantages, dtype=np.float64)
    if advantages_S.ndim != 1 or advantages_S.size != len(spans):
        raise ValueError(f"{where}: {advantages_S.shape} segment advantages for {len(spans)} spans")
    if not 0 <= length <= T:
        raise ValueError(f"{where}: response length {length} outside [0, T={T}]")
    advantages_T = np.zeros(T, dtype=np.float32)
    expected_start = 0
    for t, span in enumerate(spans):
        start, end = _span_bounds(span)
        if start != expected_start or not start < end <= length:
            raise ValueError(
                f"{where}, span {t} [{start}, {end}): spans must be non-empty and tile [0, {length}) in order; "
                f"expected this span to start at {expected_start} and end by {length}"
            )
        advantages_T[start:end] = advantages_S[t]
        expected_start = end
    if expected_start != length:
        raise ValueError(f"{where}: spans cover [0, {expected_start}) but the response has {length} tokens")
    return advantages_T


def spread_batch(
    advantages: Sequence[Any], spans: Sequence[Sequence[Any] | None], lengths: Sequence[int], T: int
) -> tuple[np.ndarray, np.ndarray]:
    """Batched `spread_to_tokens` (SPEC §4): returns (advantages_NT float32, mask_N bool).

    A None advantage (unscored rollout) gives an all-zero row and mask False, so the loss leaves it out
    (SPEC §3); its spans may be None.
    """
    if not len(advantages) == len(spans) == len(lengths):
        raise ValueError(f"{len(advantages)} advantages, {len(spans)} span lists and {len(lengths)} lengths")
    advantages_NT = np.zeros((len(advantages), T), dtype=np.float32)
    mask_N = np.zeros(len(advantages), dtype=bool)
    for i, (adv, row_spans, length) in enumerate(zip(advantages, spans, lengths)):
        if adv is None:
            continue
        if row_spans is None:
            raise ValueError(f"rollout {i}: has segment advantages but no spans")
        advantages_NT[i] = spread_to_tokens(adv, row_spans, length, T, row=i)
        mask_N[i] = True
    return advantages_NT, mask_N


def segment_stats(segment_counts: Sequence[int]) -> dict[str, float]:
    """Segments per response (SPEC §4, §9 delimiter collapse): mean, share with exactly one, max."""
    counts_N = np.asarray(segment_counts)
    if counts_N.ndim != 1 or counts_N.size == 0:
        raise ValueError(f"segment_counts must be a non-empty 1-D sequence, got shape {counts_N.shape}")
    if not np.issubdtype(counts_N.dtype, np.integer) or (counts_N < 0).any():
        raise ValueError(f"segment_counts must be non-negative ints, got {counts_N.tolist()}")
    return {
        "segments/mean": float(counts_N.mean()),
        "segments/single_frac": float((counts_N == 1).mean()),
        "segments/max": float(counts_N.max()),
    }
