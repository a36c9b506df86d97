"""The paper's comparison in miniature (SPEC §8) on the CPU testbed: every Stage-I arm, then the same Stage II,
over several seeds, written up as RESULTS.md.

  python experiments/replicate.py --workdir=workdir/replicate --seeds=0,1,2            # the full run (~2.2 h, 2 cores)
  python experiments/replicate.py --workdir=/tmp/rep --seeds=0 --quick                  # a few steps, minutes

Arms: base (no Stage I), sft (on references), grpo (sparse), self_distill, exprl_outcome, exprl_process
(DeltaNorm, single_segment="zero") and exprl_process_score (single_segment="score", for the delimiter-collapse
comparison of SPEC §4). Every RL arm samples the same number of rollouts per step; SFT trains on the same number
of sequences per step (its references).
"""
import dataclasses
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from exprl_jax.config import load_config  # noqa: E402
from exprl_jax.build import enable_compilation_cache  # noqa: E402
from exprl_jax.metrics import read_metrics  # noqa: E402
from exprl_jax.pipeline import plot_pass_at_k_curves, run_pipeline  # noqa: E402

HAND_WRITTEN = "<!-- hand-written from here on; replicate.py keeps it when it rewrites the tables above -->"
ARMS = ("base", "sft", "grpo", "self_distill", "exprl_outcome", "exprl_process", "exprl_process_score")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(ROOT, "workdir", "replicate"), "Output directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), "Arms to run.")
_CONFIG = flags.DEFINE_string("config", os.path.join(ROOT, "experiments", "configs", "default.py"),
                              "The base config (Stage I ExpRL-Outcome + Stage II).")
_QUICK = flags.DEFINE_bool("quick", False, "A few steps per stage (CI-sized).")
_RESULTS = flags.DEFINE_string("results", "", "Where to write the Markdown report (default <workdir>/RESULTS.md).")


def arm_config(name: str, seed: int, quick: bool):
    base = load_config(_CONFIG.value, seed=seed)
    overrides = {"seed": seed, "name": f"{name}_seed{seed}"}
    method = {"base": "grpo", "exprl_process_score": "exprl_process"}.get(name, name)
    overrides["method"] = method
    if name == "base":
        overrides.update({"train.steps": 0, "eval.at_end": False})  # Stage II straight from the base model
    else:
        overrides["eval.at_start"] = False  # the base model is evaluated once, in the base arm
    if name == "sft":
        overrides["train.batch_size"] = base.rollout.prompts_per_step * base.rollout.group_size
    if name == "exprl_process_score":
        overrides["process.single_segment"] = "score"
    if quick:
        overrides.update({"train.steps": 0 if name == "base" else 2, "stage2.steps": 2, "eval.num_samples": 4,
                          "data.num_eval": 8, "testbed.num_pool": 64})
    return load_config(_CONFIG.value, **overrides)


def _mean_std(values, digits: int = 3):
    """mean ± std over the seeds; a seed without the value is not averaged over silently: the cell says so."""
    present = [v for v in values if v is not None and np.isfinite(v)]
    if not present:
        return "n/a"
    mean, std = f"{np.mean(present):.{digits}f}", f"{np.std(present):.{digits}f}"
    cell = f"{mean} ± {std}" if len(present) > 1 else mean
    return cell if len(present) == len(values) else f"{cell} ({len(present)} of {len(values)} seeds)"


def _segments_trend(workdir: str) -> str:
    rows = [r for r in read_metrics(os.path.join(workdir, "stage1", "metrics.jsonl")) if "segments/mean" in r]
    if not rows:
        return "n/a"
    picks = [rows[0], rows[len(rows) // 2], rows[-1]]
    trend = " → ".join(f"{r['segments/mean']:.2f} (step {r['step']})" for r in picks)
    single = max(r.get("segments/single_frac", float("nan")) for r in rows)
    with open(os.path.join(workdir, "stage1", "results.json")) as f:
        digest = json.load(f)["params_sha256"][:12]
    # single_segment only changes an advantage when a response has one segment: with a max share of 0 the two
    # rules give bitwise-identical runs (same digest)
    return f"{trend}; single-segment share max {single:.3f}; Stage-I params sha256 {digest}"


def _trend(rows: list, key: str, window: int = 5) -> tuple[float, float] | None:
    """Mean of `key` over the first and last `window` logged steps (None when not logged)."""
    values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
    if not values:
        return None
    return float(np.mean(values[:window])), float(np.mean(values[-window:]))


def _training_row(per_seed: dict) -> str:
    """Stage-I training dynamics, first 5 -> last 5 steps (mean over seeds): the reward the arm optimised, the
    answer accuracy of its own samples on the training problems, the KL to the base; Stage II's accuracy."""
    cells = []
    for stage, key in (("stage1", "reward/mean"), ("stage1", "reward/sparse_acc"), ("stage1", "kl/ref"),
                       ("stage2", "reward/sparse_acc")):
        trends = [_trend(read_metrics(os.path.join(r["workdir"], stage, "metrics.jsonl")), key)
                  for r in per_seed.values() if os.path.exists(os.path.join(r["workdir"], stage, "metrics.jsonl"))]
        trends = [t for t in trends if t is not None]
        if key == "kl/ref":
            cells.append(f"{np.mean([t[1] for t in trends]):.4f}" if trends else "—")
        else:
            cells.append(f"{np.mean([t[0] for t in trends]):.3f} → {np.mean([t[1] for t in trends]):.3f}"
                         if trends else "—")
    return " | ".join(cells)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_report(results: dict, path: str, command: str, wall_s: float, seeds) -> None:
    def metric(arm, stage, key):
        return [((r.get(stage) or {}).get("metrics") or {}).get(key) for r in results[arm].values()]

    lines = ["# RESULTS: the ExpRL comparison in miniature (CPU testbed)", "",
             f"Command: `{command}`  ",
             f"Wall time: {wall_s / 60:.1f} min (sum over the arm runs); machine: {_machine()}; "
             f"seeds: {', '.join(map(str, seeds))}.", "",
             "## Stage I (mean ± std over seeds; eval set at the Stage-I difficulty)", "",
             "| arm | pass@1 | pass@16 | exact pass@1 | checkpoint share | response length | segments/response | "
             "never solved |", "|---|---|---|---|---|---|---|---|"]
    for arm in results:
        stage = "base" if arm == "base" else "stage1"
        lines.append(f"| {arm} | " + " | ".join(_mean_std(metric(arm, stage, k), digits) for k, digits in (
            ("pass@1", 3), ("pass@16", 3), ("exact_pass@1", 3), ("checkpoint_frac", 3), ("response_length", 1),
            ("segments_per_response", 2), ("never_solved_frac", 3))) + " |")
    lines += ["", "## After Stage II (sparse GRPO from each Stage-I checkpoint)", "",
              "| arm | pass@1 | pass@16 | exact pass@1 | never solved |", "|---|---|---|---|---|"]
    for arm in results:
        lines.append(f"| {arm} | " + " | ".join(_mean_std(metric(arm, "stage2", k)) for k in (
            "pass@1", "pass@16", "exact_pass@1", "never_solved_frac")) + " |")
    lines += ["", "## Training dynamics (first 5 → last 5 steps, mean over seeds)", "",
              "| arm | Stage-I reward | Stage-I answer accuracy (own samples) | Stage-I KL to base (end) | "
              "Stage-II answer accuracy |", "|---|---|---|---|---|"]
    for arm, per_seed in results.items():
        lines.append(f"| {arm} | {_training_row(per_seed)} |")
    lines += ["", "## Segments per response during Stage I (ExpRL-Process, SPEC §4)", ""]
    for arm in ("exprl_process", "exprl_process_score"):
        for seed, r in results.get(arm, {}).items():
            lines.append(f"- {arm}, seed {seed}: {_segments_trend(r['workdir'])}")
    lines += ["", "## pass@k curves (mean over seeds)", ""]
    plot_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "results")
    os.makedirs(plot_dir, exist_ok=True)
    for stage in ("stage1", "stage2"):
        _plot_pass_at_k(results, stage, os.path.join(plot_dir, f"pass_at_k_{stage}.png"))
        lines.append(f"![pass@k {stage}](results/pass_at_k_{stage}.png)")
    kept = ""
    if os.path.exists(path):  # the hand-written interpretation survives a regeneration of the tables
        with open(path) as f:
            old = f.read()
        if HAND_WRITTEN in old:
            kept = "\n" + old[old.index(HAND_WRITTEN):]
            print(f"{path}: kept the hand-written section below the tables; check it against the new numbers")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + kept)


def _plot_pass_at_k(results: dict, stage: str, path: str) -> None:
    """One curve per arm: pass@k at `stage` averaged over seeds."""
    curves = []
    for arm, per_seed in results.items():
        reports = [r.get("base" if arm == "base" and stage == "stage1" else stage) for r in per_seed.values()]
        reports = [r for r in reports if r]
        if reports:
            mean = {k: float(np.mean([r["pass_at_k"][k] for r in reports])) for k in reports[0]["pass_at_k"]}
            curves.append((arm, mean, "--" if arm == "exprl_process_score" else "-"))  # often on exprl_process
    title = {"stage1": "after Stage I (base: no Stage I)", "stage2": "after Stage II (sparse GRPO)"}[stage]
    seeds = len(next(iter(results.values())))
    plot_pass_at_k_curves(curves, path, title, ylabel=f"pass@k (mean over {seeds} seeds)")


def _finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "summary.json"))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    seeds = [int(s) for s in _SEEDS.value]
    unknown = set(_ARMS.value) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; expected some of {ARMS}")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    # wall seconds of every (arm, seed) pipeline that did its work, kept across invocations (runs resume)
    wall_path = os.path.join(_WORKDIR.value, "wall_seconds.json")
    walls = {}
    if os.path.exists(wall_path):
        with open(wall_path) as f:
            walls = json.load(f)
    report = _RESULTS.value or os.path.join(_WORKDIR.value, "RESULTS.md")
    command = " ".join(["python", "experiments/replicate.py"] + sys.argv[1:])
    results: dict = {arm: {} for arm in _ARMS.value}
    for seed in seeds:  # seed-major: an interrupted replication still has complete seeds
        for arm in _ARMS.value:
            cfg = arm_config(arm, seed, _QUICK.value)
            workdir = os.path.join(_WORKDIR.value, arm, f"seed{seed}")
            print(f"== {arm} seed {seed}: {workdir}", flush=True)
            done_before, t0 = _finished(workdir), time.time()
            summary = run_pipeline(cfg, workdir)
            if not done_before:
                walls[f"{arm}/seed{seed}"] = time.time() - t0
                with open(wall_path, "w") as f:
                    json.dump(walls, f, indent=1)
            results[arm][seed] = {k: summary.get(k) for k in ("base", "stage1", "stage2")}
            results[arm][seed]["workdir"] = workdir
            results[arm][seed]["config"] = dataclasses.asdict(cfg)
        done = {arm: per_seed for arm, per_seed in results.items() if per_seed}
        with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
            json.dump(done, f, indent=1, default=str)
        wall = sum(walls.get(f"{arm}/seed{s}", 0.0) for arm, per_seed in done.items() for s in per_seed)
        write_report(done, report, command, wall, seeds[: seeds.index(seed) + 1])
    with open(report) as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
