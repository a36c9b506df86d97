"""RESULTS.md of the replication: the pre-registered verdict criteria (kept verbatim from the file), the ladder tables,
paired bootstrap CIs over problems x seeds, training dynamics, the verdict those criteria give, and the plots.

The quantities (fixed before the run, see the pre-registered section of RESULTS.md):
- M, held-out late-step accuracy: on the Stage-I rung (k = the pool's chain length), after Stage I, per problem
  the mean over the late positions j = floor(k/2)+1 .. k of the share of samples that establish at least j
  checkpoints before any contradiction.
- P1: pass@1 on the Stage-I rung after Stage II. P64: pass@n (n = eval.final_num_samples) on the hardest rung
  after Stage II.
"""
from __future__ import annotations

import os

import numpy as np

from exprl_jax.metrics import read_metrics
from exprl_jax.report import late_positions, plot_pass_at_k_curves
from exprl_jax.significance import format_ci, paired_bootstrap, per_problem_pass_at_k

PRE_START = "<!-- pre-registered: written before any number below; replicate.py keeps it verbatim -->"
PRE_END = "<!-- end of the pre-registered section -->"
HAND_WRITTEN = "<!-- hand-written from here on; replicate.py keeps it when it rewrites the tables above -->"
EXPRL_ARMS = ("exprl_outcome", "exprl_process")


def late_reach_P(report: dict, k: int) -> np.ndarray:
    """[P] M of every problem of one ladder report (see the module docstring)."""
    return np.array([np.mean([p["reach"][j - 1] / p["samples"] for j in late_positions(k)]) if p["samples"] else
                     np.nan for p in report["per_problem"]])


def counts(report: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([p["correct"] for p in report["per_problem"]]),
            np.array([p["samples"] for p in report["per_problem"]]))


class Replication:
    """Per-(arm, seed) pipeline summaries and the quantities of the verdict."""

    def __init__(self, results: dict, pool_rung: str, final_n: int):
        self.results, self.pool_rung, self.final_n = results, pool_rung, final_n
        self.k = int(pool_rung.lstrip("k"))

    def seeds(self, arm: str) -> list:
        return sorted(self.results.get(arm, {}))

    def report(self, arm: str, seed, stage: str, rung: str | None = None) -> dict | None:
        s = self.results[arm][seed]["summary"]
        if stage == "stage1" and not s.get("stage1"):
            stage = "base"  # an arm without Stage I: its Stage-I checkpoint is the base
        reports = s.get(stage)
        return reports[rung or self.pool_rung] if reports else None

    def values(self, arm: str, seeds, quantity: str) -> np.ndarray:
        """[S, P] per-problem values of M, P1 or P<n> for `arm` (rows: seeds)."""
        rows = []
        for seed in seeds:
            if quantity == "M":
                rows.append(late_reach_P(self.report(arm, seed, "stage1"), self.k))
            elif quantity == "P1":
                rows.append(per_problem_pass_at_k(*counts(self.report(arm, seed, "stage2")), 1))
            else:  # P<n>: the final pass on the hardest rung after Stage II
                final = self.results[arm][seed]["summary"]["stage2_final"]
                rows.append(per_problem_pass_at_k(*counts(final[list(final)[-1]]), self.final_n))
        return np.array(rows)

    def diff(self, a: str, b: str, quantity: str) -> dict:
        seeds = [s for s in self.seeds(a) if s in self.seeds(b)]
        if not seeds:
            return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "significant": False}
        return paired_bootstrap(self.values(a, seeds, quantity), self.values(b, seeds, quantity))

    def reward_trend(self, arm: str, window: int = 10) -> tuple[float, float, float] | None:
        """(first, last, SE of last - first): Stage-I reward over its first and last `window` steps, seeds pooled."""
        first, last = [], []
        for seed in self.seeds(arm):
            path = os.path.join(self.results[arm][seed]["workdir"], "stage1", "metrics.jsonl")
            rows = [r["reward/mean"] for r in read_metrics(path) if r.get("reward/mean") is not None
                    and np.isfinite(r["reward/mean"])] if os.path.exists(path) else []
            if len(rows) >= 2 * window:
                first += rows[:window]
                last += rows[-window:]
        if not first:
            return None
        se = np.sqrt(np.var(first, ddof=1) / len(first) + np.var(last, ddof=1) / len(last))
        return float(np.mean(first)), float(np.mean(last)), float(se)

    def verdict(self) -> tuple[str, list[str]]:
        """The pre-registered decision rule, applied to the measured CIs (see RESULTS.md)."""
        lines = []
        positive = self.diff("exact_step", "base", "M") if "exact_step" in self.results else None
        if positive is None or not positive["significant"] or positive["diff"] <= 0:
            lines.append(f"positive control (exact per-step reward) minus base on M: "
                         f"{format_ci(positive) if positive else 'not run'}: the budget did not move held-out "
                         "late-step accuracy even with an exact per-step reward")
            return "inconclusive", lines
        lines.append(f"positive control minus base on M: {format_ci(positive)}: the budget can move it")
        works, null = [], []
        for arm in EXPRL_ARMS:
            if arm not in self.results:
                continue
            d, w = self.diff(arm, "base", "M"), self.diff(arm, "wrong_reference", "M")
            trend = self.reward_trend(arm)
            rises = trend is not None and trend[1] - trend[0] > 2 * trend[2]
            lines.append(f"{arm}: minus base {format_ci(d)}; minus wrong reference {format_ci(w)}; judge reward "
                         + (f"{trend[0]:.3f} -> {trend[1]:.3f} (SE of the change {trend[2]:.3f})" if trend else "n/a"))
            if d["low"] > 0 and w["low"] > 0 and rises:
                works.append(arm)
            elif d["high"] < positive["diff"]:
                null.append(arm)
        if works:
            return "ExpRL works, the testbed is too small", lines + [f"criteria met by: {', '.join(works)}"]
        if null and len(null) == len([a for a in EXPRL_ARMS if a in self.results]):
            return "ExpRL does not work here", lines
        return "inconclusive", lines


def _mean_std(values, digits: int = 3) -> str:
    present = [v for v in values if v is not None and np.isfinite(v)]
    if not present:
        return "n/a"
    cell = f"{np.mean(present):.{digits}f}" + (f" ± {np.std(present):.{digits}f}" if len(present) > 1 else "")
    return cell if len(present) == len(values) else f"{cell} ({len(present)} of {len(values)} seeds)"


def ladder_rows(rep: Replication, stage: str) -> list[str]:
    any_arm = next(iter(rep.results))
    rungs = list(rep.results[any_arm][rep.seeds(any_arm)[0]]["summary"]["base"])
    lines = ["| arm | " + " | ".join(f"{r} pass@1" for r in rungs) + f" | M ({rep.pool_rung}) | exact pass@1 "
             f"({rep.pool_rung}) |", "|---" * (len(rungs) + 3) + "|"]
    for arm in rep.results:
        seeds = rep.seeds(arm)
        cells = [_mean_std([rep.report(arm, s, stage, r)["pass_at_k"]["1"] for s in seeds]) for r in rungs]
        cells.append(_mean_std([np.nanmean(late_reach_P(rep.report(arm, s, stage), rep.k)) for s in seeds]))
        cells.append(_mean_std([rep.report(arm, s, stage)["metrics"].get("exact_pass@1") for s in seeds]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def ci_rows(rep: Replication) -> list[str]:
    q_final = f"P{rep.final_n}"
    lines = [f"| arm | minus base: M | minus base: P1 | minus base: {q_final} | minus sparse GRPO: P1 | "
             f"minus wrong reference: M |", "|---|---|---|---|---|---|"]
    for arm in rep.results:
        if arm == "base":
            continue
        cells = [format_ci(rep.diff(arm, "base", q)) for q in ("M", "P1", q_final)]
        cells.append(format_ci(rep.diff(arm, "grpo", "P1")) if "grpo" in rep.results and arm != "grpo" else "—")
        cells.append(format_ci(rep.diff(arm, "wrong_reference", "M")) if "wrong_reference" in rep.results
                     and arm != "wrong_reference" else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def dynamics_rows(rep: Replication) -> list[str]:
    lines = ["| arm | Stage-I reward, first 10 → last 10 steps | groups with signal: judge / sparse | "
             "KL to base (end) |", "|---|---|---|---|"]
    for arm in rep.results:
        trend = rep.reward_trend(arm)
        judge, sparse, kl = [], [], []
        for seed in rep.seeds(arm):
            path = os.path.join(rep.results[arm][seed]["workdir"], "stage1", "metrics.jsonl")
            rows = read_metrics(path) if os.path.exists(path) else []
            judge += [r["signal/judge_groups"] for r in rows if "signal/judge_groups" in r]
            sparse += [r["signal/sparse_groups"] for r in rows if "signal/sparse_groups" in r]
            kl += [r["kl/ref"] for r in rows[-5:] if "kl/ref" in r]
        cells = [f"{trend[0]:.3f} → {trend[1]:.3f} (± {trend[2]:.3f})" if trend else "—",
                 f"{np.mean(judge):.2f} / {np.mean(sparse):.2f}" if judge else "—",
                 f"{np.mean(kl):.4f}" if kl else "—"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def plot(rep: Replication, stage: str, path: str) -> None:
    curves = []
    for arm in rep.results:
        reports = []
        for seed in rep.seeds(arm):
            s = rep.results[arm][seed]["summary"]
            ladder = s.get(f"{stage}_final") or s.get(stage) or s.get("base")
            reports.append(ladder[list(ladder)[-1]])
        mean = {k: float(np.mean([r["pass_at_k"][k] for r in reports])) for k in reports[0]["pass_at_k"]}
        curves.append((arm, mean, "--" if arm in ("base", "wrong_reference", "exact_step") else "-"))
    title = {"stage1": "after Stage I, hardest rung", "stage2": "after Stage II, hardest rung"}[stage]
    plot_pass_at_k_curves(curves, path, title, ylabel="pass@k (mean over seeds)")
