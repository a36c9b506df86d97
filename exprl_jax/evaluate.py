"""Checkpoint evaluation (SPEC §7): the unbiased pass@k estimator and pass@k tables over a benchmark, fed
with (samples, correct) counts per problem by the sampling loop.
"""
from __future__ import annotations

import operator
from typing import Iterable, Sequence

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


def evaluate_policy(model_cfg, params, tokenizer, records, rng, *, num_samples: int, temperature: float,
                    max_new_tokens: int, template: str, answer_style: str, eos, pad: int, mesh=None,
                    delimiter: str = "###", prompts_per_batch: int = 0, chat: bool = False,
                    max_concurrent_rows: int = 0, progress: str | None = None) -> dict:
    """n samples per problem at `temperature`, answers checked for equivalence (not string equality), pass@k for
    k = 1, 2, 4, ... n, and behaviour statistics (SPEC §7). Records that carry `checkpoints` also get exact-trace
    success (right answer and every checkpoint written, `exact_pass@k`) and the mean share of checkpoints written.
    `progress`: a label for console lines at the start and after every chunk of `prompts_per_batch` problems.
    Returns {"metrics", "pass_at_k", "per_problem"}."""
    import time

    import jax
    import numpy as np

    from exprl_jax.config import RolloutSection
    from exprl_jax.metrics import report_progress
    from exprl_jax.rewards.answers import check_answers, extract_answer
    from exprl_jax.rollouts import sample_rollouts

    sampling = RolloutSection(group_size=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                              top_p=1.0, top_k=0, max_concurrent_rows=max_concurrent_rows)
    batch = prompts_per_batch or len(records)
    from exprl_jax.judge.programmatic import checkpoints_of, statements

    correct_counts, exact_counts, checkpoint_fracs, lengths, truncated, segments, texts = [], [], [], [], [], [], []
    started = time.time()
    from exprl_jax import distributed

    progress = progress if distributed.is_primary() else None  # one process speaks for a multi-process run
    if progress:
        print(f"{progress}: sampling {len(records)} problems x {num_samples} (up to {max_new_tokens} new tokens)",
              flush=True)
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        r = sample_rollouts(model_cfg, params, tokenizer, chunk, jax.random.fold_in(rng, start),
                            rollout_cfg=sampling, template=template, eos=eos, pad=pad, mesh=mesh, chat=chat)
        preds = [extract_answer(t, style=answer_style) for t in r.texts]
        checks = check_answers(preds, [rec.answer for rec in r.row_records()])
        ok = np.array([c.correct for c in checks]) & ~r.truncated
        correct_counts += ok.reshape(len(chunk), num_samples).sum(axis=1).tolist()
        if all(rec.checkpoints for rec in chunk):
            fracs = []
            for text, rec in zip(r.texts, r.row_records()):
                written = statements(text)
                wanted = checkpoints_of("\n".join(rec.checkpoints))
                fracs.append(sum(v in written.get(n, ()) for n, v in wanted) / len(wanted))
            fracs = np.asarray(fracs)
            checkpoint_fracs += fracs.tolist()
            exact_counts += (ok & (fracs == 1.0)).reshape(len(chunk), num_samples).sum(axis=1).tolist()
        lengths += r.lengths.tolist()
        truncated += r.truncated.tolist()
        segments += [sum(1 for piece in t.split(delimiter) if piece.strip()) for t in r.texts]
        texts += r.texts
        if progress:
            report_progress(progress, start + len(chunk), len(records), "problems", started)
    ks = default_ks(num_samples)
    table = pass_at_k_table([num_samples] * len(records), correct_counts, ks)
    metrics = {f"pass@{k}": v for k, v in table.items()}
    metrics.update({
        "response_length": float(np.mean(lengths)), "truncated_frac": float(np.mean(truncated)),
        "segments_per_response": float(np.mean(segments)),
        "never_solved_frac": float(np.mean(np.asarray(correct_counts) == 0)),
        "problems": len(records),
    })
    if len(exact_counts) == len(records):
        exact = pass_at_k_table([num_samples] * len(records), exact_counts, ks)
        metrics.update({f"exact_pass@{k}": v for k, v in exact.items()})
        metrics["checkpoint_frac"] = float(np.mean(checkpoint_fracs))
    per_problem = [{"id": rec.id, "correct": c, "samples": num_samples, "example": texts[i * num_samples][:500]}
                   for i, (rec, c) in enumerate(zip(records, correct_counts))]
    return {"metrics": metrics, "pass_at_k": {str(k): v for k, v in table.items()}, "per_problem": per_problem}
