"""Stage I then Stage II (SPEC §2) as two runs under one workdir, and the comparison table and pass@k plot.

`<workdir>/stage1` runs the configured method; `<workdir>/stage2` runs sparse GRPO from its final params. The base
model's evaluation is Stage I's `eval_start`; each stage resumes on its own, so the pipeline resumes too.
"""
from __future__ import annotations

import dataclasses
import os

from exprl_jax import distributed, storage
from exprl_jax.config import ExperimentConfig
from exprl_jax.experiment import Experiment


def stage2_config(cfg: ExperimentConfig, stage1_workdir: str) -> ExperimentConfig:
    s2 = cfg.stage2
    return dataclasses.replace(
        cfg, name=f"{cfg.name}_stage2", method="stage2", loss=dataclasses.replace(
            cfg.loss, clip_high=-1.0, kl_coef=-1.0, entropy_coef=-1.0, scale_by_std="auto"),
        model=dataclasses.replace(cfg.model, init_checkpoint=stage1_workdir, hf_path=""),
        optim=dataclasses.replace(cfg.optim, learning_rate=s2.learning_rate if s2.learning_rate > 0
                                  else cfg.optim.learning_rate),
        rollout=dataclasses.replace(cfg.rollout, group_size=s2.group_size or cfg.rollout.group_size),
        train=dataclasses.replace(cfg.train, steps=s2.steps),
        # at_start would equal Stage I's eval_end; at_end always (an arm without Stage I has eval.at_end off)
        eval=dataclasses.replace(cfg.eval, at_start=False, at_end=True),
        stage2=dataclasses.replace(s2, steps=0))


def run_pipeline(cfg: ExperimentConfig, workdir: str) -> dict:
    """Runs Stage I (cfg.method; skipped when cfg.train.steps == 0) and, if cfg.stage2.steps > 0, Stage II."""
    stage1_dir = os.path.join(workdir, "stage1")
    stage1 = Experiment(cfg, stage1_dir).run()
    summary = {"base": stage1.get("eval_start"), "stage1": stage1.get("eval_end"), "stage1_results": stage1}
    if cfg.stage2.steps > 0:
        stage2 = Experiment(stage2_config(cfg, stage1_dir), os.path.join(workdir, "stage2")).run()
        summary.update(stage2=stage2.get("eval_end"), stage2_results=stage2)
    table = format_table(summary, cfg)

    def write():  # once, by process 0
        out = storage.as_path(workdir)
        storage.write_json(out / "summary.json", {k: v for k, v in summary.items() if not k.endswith("_results")})
        (out / "summary.md").write_text(table + "\n")
        plot_pass_at_k(summary, out / "pass_at_k.png", title=f"{cfg.name}: {cfg.method}")

    distributed.from_primary(write)
    summary["table"] = table
    return summary


def format_table(summary: dict, cfg: ExperimentConfig) -> str:
    rows = [("base", summary.get("base")), (f"after Stage I ({cfg.method})", summary.get("stage1")),
            ("after Stage II (sparse GRPO)", summary.get("stage2"))]
    ks = sorted({int(k) for _, r in rows if r for k in r["pass_at_k"]})
    head = "| checkpoint | " + " | ".join(f"pass@{k}" for k in ks) + " | never solved | response length |"
    lines = [head, "|" + "---|" * (len(ks) + 3)]
    for name, report in rows:
        if report:
            m = report["metrics"]
            cells = [f"{report['pass_at_k'].get(str(k), float('nan')):.3f}" for k in ks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['never_solved_frac']:.3f} | "
                         f"{m['response_length']:.1f} |")
    return "\n".join(lines)


def plot_pass_at_k(summary: dict, path: str, title: str = "") -> None:
    """pass@k of the base, Stage-I and Stage-II evaluations of one pipeline run."""
    curves = [(name, summary[key]["pass_at_k"], "-") for name, key in
              (("base", "base"), ("Stage I", "stage1"), ("Stage II", "stage2")) if summary.get(key)]
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
