"""What a pipeline run prints and plots: the ladder table, Stage I's training signal (judge versus sparse on the
same rollouts, the judge reward over the first and last steps), held-out accuracy per chain position, and pass@k up
to the final sample count with paired bootstrap CIs ("n.s." where the CI covers 0).
"""
from __future__ import annotations

import os

import numpy as np

from exprl_jax.metrics import read_metrics
from exprl_jax.significance import format_ci, paired_bootstrap, per_problem_pass_at_k

STAGES = (("base", "base"), ("stage1", "after Stage I"), ("stage2", "after Stage II"))


def _counts(report: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([p["correct"] for p in report["per_problem"]]),
            np.array([p["samples"] for p in report["per_problem"]]))


def ladder_table(summary: dict, method: str) -> list[str]:
    rungs = list(summary["base"])
    lines = ["| checkpoint | " + " | ".join(f"{r} pass@1" for r in rungs) + " | " +
             " | ".join(f"{r} pass@16" for r in rungs) + " |", "|---" * (1 + 2 * len(rungs)) + "|"]
    for key, name in STAGES:
        if summary.get(key):
            label = f"{name} ({method})" if key == "stage1" else name
            cells = [summary[key][r]["pass_at_k"].get(str(k)) for k in (1, 16) for r in rungs]
            lines.append(f"| {label} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    return lines


def mean_se(values) -> str:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not values.size:
        return "n/a"
    se = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return f"{values.mean():.3f} ± {se:.3f}"


def training_signal(stage1_dir: str, window: int = 10) -> list[str]:
    """Groups with any GRPO signal under the judge vs the answer check, and the judge reward's first/last steps."""
    path = os.path.join(stage1_dir, "metrics.jsonl")
    rows = [r for r in read_metrics(path) if r["step"] > 0] if os.path.exists(path) else []
    if not rows:
        return []
    lines = []
    judge, sparse = ([r.get(k) for r in rows] for k in ("signal/judge_groups", "signal/sparse_groups"))
    if any(v is not None for v in judge):
        lines.append(f"- share of groups with any reward signal, on the same rollouts (mean ± SE over {len(rows)} "
                     f"steps): judge {mean_se(judge)}, sparse answer check {mean_se(sparse)}")
    rewards = [r.get("reward/mean") for r in rows]
    if any(v is not None for v in rewards):
        n = min(window, len(rows) // 2) or 1
        lines.append(f"- Stage-I reward, mean ± SE over steps: first {n} steps {mean_se(rewards[:n])}, "
                     f"last {n} steps {mean_se(rewards[-n:])}")
    return lines


def chain_table(summary: dict, rung: str) -> list[str]:
    reach = {key: summary[key][rung].get("chain_reach") for key, _ in STAGES if summary.get(key)}
    if not any(reach.values()):
        return []
    width = max(len(v) for v in reach.values() if v)
    lines = [f"Held-out accuracy per chain position on {rung} (share of samples whose first j steps are all right):",
             "", "| checkpoint | " + " | ".join(f"j={j}" for j in range(1, width + 1)) + " |", "|---" * (width + 1) + "|"]
    for key, name in STAGES:
        if reach.get(key):
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in reach[key]) + " |")
    return lines


def pass_at_k_ci(before: dict, after: dict, label: str) -> list[str]:
    """pass@k at every k of the report, before vs after, with the paired bootstrap CI over problems."""
    rung = list(after)[-1]
    b, a = before[rung], after[rung]
    cb, nb = _counts(b)
    ca, na = _counts(a)
    lines = [f"pass@k on {rung} ({len(cb)} problems, n = {int(nb.max())} samples each), {label} minus base, "
             "paired bootstrap 95% CI over problems:", "", "| k | base | " + label + " | difference [95% CI] |",
             "|---|---|---|---|"]
    for k in sorted(int(k) for k in a["pass_at_k"]):
        ci = paired_bootstrap(per_problem_pass_at_k(ca, na, k), per_problem_pass_at_k(cb, nb, k))
        lines.append(f"| {k} | {b['pass_at_k'][str(k)]:.3f} | {a['pass_at_k'][str(k)]:.3f} | {format_ci(ci)} |")
    return lines


def format_table(summary: dict, cfg, workdir: str) -> str:
    rungs = list(summary["base"])
    stage1_k = f"k{cfg.testbed.stage1_steps[-1]}" if cfg.data.source == "testbed" else ""
    lines = [f"Evaluation ladder ({cfg.eval.num_samples} samples per problem, T = {cfg.eval.temperature}):", ""]
    lines += ladder_table(summary, cfg.method)
    signal = training_signal(os.path.join(workdir, "stage1"))
    if signal:
        lines += ["", f"Stage I ({cfg.method}, {cfg.train.steps} steps):"] + signal
    chain = chain_table(summary, stage1_k if stage1_k in rungs else rungs[-1])
    if chain:
        lines += [""] + chain
    final_after = summary.get("stage2_final") or summary.get("stage2")
    final_before = summary.get("base_final") if summary.get("stage2_final") else summary.get("base")
    if final_after and final_before:
        lines += [""] + pass_at_k_ci(final_before, final_after, "after Stage II")
    return "\n".join(lines)


def plot_pass_at_k(summary: dict, path: str, title: str = "") -> None:
    """pass@k of the base, Stage-I and Stage-II evaluations of one pipeline run on the hardest rung."""
    curves = []
    for key, label in STAGES:
        reports = summary.get(f"{key}_final") or summary.get(key)
        if reports:
            curves.append((label, reports[list(reports)[-1]]["pass_at_k"], "-"))
    plot_pass_at_k_curves(curves, path, title)


def plot_pass_at_k_curves(curves, path: str, title: str = "", ylabel: str = "pass@k") -> None:
    """One line per (label, {str(k): pass@k}, linestyle) on a log2 k axis, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4) if len(curves) > 3 else (5, 3.5), dpi=120)
    for label, pass_at_k, linestyle in curves:
        ks = sorted(int(k) for k in pass_at_k)
        ax.plot(ks, [pass_at_k[str(k)] for k in ks], marker="o", label=label, linestyle=linestyle)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(curves) > 3 else None)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
