"""Checkpoint evaluation (SPEC §7): the unbiased pass@k estimator and pass@k tables over a benchmark, fed
with (samples, correct) counts per problem by the sampling loop.
"""
from __future__ import annotations

import operator
from typing import Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------- pass@k (pure)


def _as_count(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k) (SPEC §7).

    The ratio is computed as the product ∏_{i=n−c+1}^{n} (1 − k/i), which stays in [0, 1] at every step, so
    n in the thousands is exact to ~1e-13 and no huge binomial is ever formed. If n − c < k every draw of k
    samples contains a correct one and the result is 1.0.
    """
    n, c, k = _as_count("n", n), _as_count("c", c), _as_count("k", k)
    if n < 1 or k < 1 or c < 0:
        raise ValueError(f"pass@k needs n >= 1, k >= 1, c >= 0; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@k with k={k} needs at least k samples, got n={n}")
    if c > n:
        raise ValueError(f"c={c} correct samples out of n={n}")
    if n - c < k:
        return 1.0
    all_wrong_ratio = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong_ratio *= 1.0 - k / i
    return 1.0 - all_wrong_ratio


def pass_at_k_table(
    num_samples_per_problem: Sequence[int], num_correct: Sequence[int], ks: Iterable[int]
) -> dict[int, float]:
    """Mean pass@k over problems for each k in `ks` (SPEC §7). Every problem needs at least max(ks) samples."""
    if len(num_samples_per_problem) != len(num_correct):
        raise ValueError(
            f"{len(num_samples_per_problem)} sample counts but {len(num_correct)} correct counts"
        )
    if not num_samples_per_problem:
        raise ValueError("pass@k table over zero problems")
    table = {}
    for k in ks:
        total = 0.0
        for problem, (n, c) in enumerate(zip(num_samples_per_problem, num_correct)):
            try:
                total += pass_at_k(n, c, k)
            except ValueError as err:
                raise ValueError(f"problem {problem}: {err}") from None
        table[_as_count("k", k)] = total / len(num_samples_per_problem)
    if not table:
        raise ValueError("pass@k table with no ks")
    return table


def default_ks(n: int) -> list[int]:
    """[1, 2, 4, ..., n]: the powers of two up to n, plus n itself when it is not a power of two."""
    n = _as_count("n", n)
    if n < 1:
        raise ValueError(f"default_ks needs n >= 1, got {n}")
    ks = [1 << p for p in range(n.bit_length())]  # the largest, 1 << (bit_length − 1), is <= n
    if ks[-1] != n:
        ks.append(n)
    return ks


# ---------------------------------------------------------------- the sampling eval loop


def chain_reach(progress_per_sample, totals) -> list[float]:
    """Held-out accuracy per chain position: entry j-1 is the share of samples whose first j checkpoints are all
    established, over the samples whose problem has at least j checkpoints."""
    progress, totals = np.asarray(progress_per_sample), np.asarray(totals)
    return [float(np.mean(progress[totals >= j] >= j)) for j in range(1, int(totals.max(initial=0)) + 1)]


def evaluate_policy(model_cfg, params, tokenizer, records, rng, *, num_samples: int, temperature: float,
                    max_new_tokens: int, template: str, answer_style: str, eos, pad: int, mesh=None,
                    delimiter: str = "###", prompts_per_batch: int = 0, chat: bool = False,
                    max_concurrent_rows: int = 0, progress: str | None = None) -> dict:
    """n samples per problem at `temperature`, answers checked for equivalence (not string equality), pass@k for
    k = 1, 2, 4, ... n, and behaviour statistics (SPEC §7). A sample whose check gave no verdict (checker timeout)
    is left out of its problem's count and counted in `no_verdict`; pass@k averages over the problems with at
    least k verdicts. Records that carry `checkpoints` also get exact-trace success (the programmatic judge's
    level 5: every checkpoint established, none contradicted, and the answer: `exact_pass@k`), the mean share of
    checkpoints established, and `chain_reach` (accuracy per chain position; per problem, `reach[j-1]` counts the
    samples whose first j steps are right). `progress`: a label for console lines at the start and after every
    chunk of `prompts_per_batch` problems. Returns {"metrics", "pass_at_k", "per_problem", "chain_reach"}."""
    import time

    import jax

    from exprl_jax import distributed
    from exprl_jax.config import RolloutSection
    from exprl_jax.judge.programmatic import checkpoints_of, verify
    from exprl_jax.metrics import report_progress
    from exprl_jax.rewards.sparse import answer_verdicts
    from exprl_jax.rollouts import sample_rollouts

    sampling = RolloutSection(group_size=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                              top_p=1.0, top_k=0, max_concurrent_rows=max_concurrent_rows)
    batch = prompts_per_batch or len(records)
    with_checkpoints = all(rec.checkpoints for rec in records)
    verdicts, exact, checkpoint_fracs, chain_progress, totals = [], [], [], [], []
    lengths, truncated, segments, texts = [], [], [], []
    started = time.time()
    progress = progress if distributed.is_primary() else None  # one process speaks for a multi-process run
    if progress:
        print(f"{progress}: sampling {len(records)} problems x {num_samples} (up to {max_new_tokens} new tokens)",
              flush=True)
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        r = sample_rollouts(model_cfg, params, tokenizer, chunk, jax.random.fold_in(rng, start),
                            rollout_cfg=sampling, template=template, eos=eos, pad=pad, mesh=mesh, chat=chat)
        rows = r.row_records()
        verdicts += answer_verdicts(r.texts, [rec.answer for rec in rows], r.truncated, style=answer_style)[0].tolist()
        if with_checkpoints:
            for text, rec, cut in zip(r.texts, rows, r.truncated):
                v = verify(text, checkpoints_of("\n".join(rec.checkpoints)), rec.answer)
                exact.append(bool(v.complete and not cut))
                checkpoint_fracs.append(v.established / v.total)
                chain_progress.append(v.progress)
                totals.append(v.total)
        lengths += r.lengths.tolist()
        truncated += r.truncated.tolist()
        segments += [sum(1 for piece in t.split(delimiter) if piece.strip()) for t in r.texts]
        texts += r.texts
        if progress:
            report_progress(progress, start + len(chunk), len(records), "problems", started)
    verdicts_PS = np.asarray(verdicts).reshape(len(records), num_samples)
    judged_P = (~np.isnan(verdicts_PS)).sum(axis=1)
    correct_P = np.nansum(verdicts_PS, axis=1).astype(int)
    ks = default_ks(num_samples)
    table = _pass_at_k_judged(judged_P, correct_P, ks)
    metrics = {f"pass@{k}": v for k, v in table.items()}
    metrics.update({
        "response_length": float(np.mean(lengths)), "truncated_frac": float(np.mean(truncated)),
        "segments_per_response": float(np.mean(segments)),
        "never_solved_frac": float(np.mean(correct_P == 0)), "problems": len(records),
        "no_verdict": int(num_samples * len(records) - judged_P.sum()),
    })
    exact_P, reach_P = None, [None] * len(records)
    if with_checkpoints:
        exact_P = np.asarray(exact).reshape(len(records), num_samples).sum(axis=1)
        progress_PS = np.asarray(chain_progress).reshape(len(records), num_samples)
        reach_P = [[int((progress_PS[i] >= j).sum()) for j in range(1, len(rec.checkpoints) + 1)]
                   for i, rec in enumerate(records)]
        metrics.update({f"exact_pass@{k}": v for k, v in pass_at_k_table([num_samples] * len(records),
                                                                         exact_P.tolist(), ks).items()})
        metrics["checkpoint_frac"] = float(np.mean(checkpoint_fracs))
    per_problem = [{"id": rec.id, "correct": int(correct_P[i]), "samples": int(judged_P[i]),
                    **({"exact": int(exact_P[i]), "reach": reach_P[i]} if exact_P is not None else {}),
                    "example": texts[i * num_samples][:500]} for i, rec in enumerate(records)]
    return {"metrics": metrics, "pass_at_k": {str(k): v for k, v in table.items()}, "per_problem": per_problem,
            "chain_reach": chain_reach(chain_progress, totals) if with_checkpoints else []}


def _pass_at_k_judged(judged_P, correct_P, ks) -> dict[int, float]:
    """pass@k over the problems with at least k samples that got a verdict (NaN when none has)."""
    table = {}
    for k in ks:
        eligible = [(int(n), int(c)) for n, c in zip(judged_P, correct_P) if n >= k]
        table[k] = (float(np.mean([pass_at_k(n, c, k) for n, c in eligible])) if eligible else float("nan"))
    return table
