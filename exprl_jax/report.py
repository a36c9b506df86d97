"""What a pipeline run prints and plots: the ladder table, Stage I's training signal (judge versus sparse on the
same rollouts, the judge reward over the first and last steps), held-out accuracy per chain position, and pass@k up
to the final sample count with paired bootstrap CIs ("n.s." where the CI covers 0).
"""
from __future__ import annotations

import os

import numpy as np

from exprl_jax import storage
from exprl_jax.metrics import read_metrics
from exprl_jax.significance import format_ci, mde, mde_resampled, paired_bootstrap, per_problem_pass_at_k

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
    try:
        rows = [r for r in read_metrics(os.path.join(stage1_dir, "metrics.jsonl")) if r["step"] > 0]
    except FileNotFoundError:  # no steps logged
        rows = []
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


def late_positions(k: int) -> range:
    """The late chain positions of M, held-out late-step accuracy (RESULTS.md): j = floor(k/2)+1 .. k."""
    return range(k // 2 + 1, k + 1)


def minimum_detectable_effects_of(base: dict, cfg, seeds: int) -> dict:
    """MDEs (paired, two-sided 5%, 80% power) of M and pass@1 on the Stage-I rung and of pass@n on the hardest rung
    after `eval.final_num_samples` samples, from a base evaluation {"ladder", "final"} (sampling noise only)."""
    ladder = base["ladder"]
    rung = f"k{cfg.testbed.stage1_steps[-1]}" if f"k{cfg.testbed.stage1_steps[-1]}" in ladder else list(ladder)[-1]
    problems = ladder[rung]["per_problem"]
    out = {"rung": rung, "seeds": seeds, "problems": len(problems)}
    rates = np.array([p["correct"] / max(p["samples"], 1) for p in problems])
    out["P1"], out["P1_base"] = mde(rates, samples=cfg.eval.num_samples, k=1, seeds=seeds), float(rates.mean())
    if problems and "reach" in problems[0]:
        k = len(problems[0]["reach"])
        per_sample = []
        for p in problems:  # each sample's share of the late positions reached, from the reach counts
            reach = p["reach"] + [0]
            progress = np.repeat(np.arange(k + 1), [p["samples"] - reach[0]] + [reach[j] - reach[j + 1]
                                                                                for j in range(k)])
            per_sample.append(np.clip(progress - k // 2, 0, None) / len(late_positions(k)))
        out["M"] = mde_resampled(per_sample, seeds=seeds)
        out["M_base"] = float(np.mean([v.mean() for v in per_sample]))
    if base.get("final"):
        hardest, m = list(base["final"])[-1], cfg.eval.final_num_samples
        final = base["final"][hardest]
        rates = np.array([p["correct"] / max(p["samples"], 1) for p in final["per_problem"]])
        out.update({"hardest": hardest, "final_n": m, "final": mde(rates, samples=m, k=m, seeds=seeds),
                    "final_base": float(final["pass_at_k"][str(m)])})
    return out


def format_mde(m: dict) -> str:
    text = (f"Minimum detectable effects (paired, two-sided 5%, 80% power; {m['problems']} problems x {m['seeds']} "
            f"seed(s); evaluation sampling noise only, training-seed variance comes on top): ")
    parts = []
    if "M" in m:
        parts.append(f"M on {m['rung']} {m['M']:.3f} (base {m['M_base']:.3f})")
    parts.append(f"pass@1 on {m['rung']} {m['P1']:.4f} (base {m['P1_base']:.4f})")
    if "final" in m:
        parts.append(f"pass@{m['final_n']} on {m['hardest']} {m['final']:.3f} (base {m['final_base']:.3f})")
    return text + "; ".join(parts) + "."


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
    with storage.as_path(path).open("wb") as f:  # local or gs://
        fig.savefig(f, format="png")
    plt.close(fig)
