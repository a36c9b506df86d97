"""The paper's comparison in miniature (SPEC §8) on the CPU testbed: every Stage-I arm and the controls, then the
same Stage II, over several seeds, written up as RESULTS.md with the verdict its pre-registered section defines.

  python experiments/replicate.py --workdir=workdir/replicate --seeds=0,1,2 --results=RESULTS.md   # the full run
  python experiments/replicate.py --workdir=/tmp/rep --seeds=0 --quick                            # minutes

Arms (experiments/configs/default.py is the ExpRL-Outcome arm; the others change only what they name):
  base (no Stage I) · exact_step (positive control: exact per-step reward, GroupNorm) · exprl_outcome ·
  wrong_reference (ExpRL-Outcome judged against another problem's reference: drift without information) ·
  grpo (sparse) · exprl_process (DeltaNorm, prefix context, fully on-policy) · self_distill (lr 0.1x, SPEC §6) ·
  sft (batch 32, 2 epochs, SPEC §6); sensitivity rows: noisy_judge (calibrated judge noise) ·
  self_distill_lr1x · strong_teacher (self-distillation from the earlier base, assets/testbed_base_strong_teacher).
Seed-major and resumable: re-running the command continues where it stopped; the report is rewritten after every
finished run (marked "not yet" until all have finished); `--report_only` rewrites it from the finished runs. The
minimum detectable effects are computed from the base's evaluation and printed before any arm.
`--archive=DIR` keeps what the report reads of every finished run (summary, Stage-I/II metrics, configs, wall time)
in DIR, laid out like the workdir: a run found there is not run again, so a replication longer than one machine's
life continues on another from a committed archive, and `--report_only --workdir=DIR` rebuilds the report from it.
"""
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402

import replication_report as rr  # noqa: E402
from exprl_jax.config import load_config  # noqa: E402
from exprl_jax.build import enable_compilation_cache, load_records  # noqa: E402
from exprl_jax.pipeline import base_evaluation, evaluation_sets, run_pipeline  # noqa: E402
from exprl_jax.report import format_mde, minimum_detectable_effects_of  # noqa: E402

CORE = ("base", "exact_step", "exprl_outcome", "wrong_reference", "grpo", "exprl_process", "self_distill", "sft")
SENSITIVITY = ("noisy_judge", "self_distill_lr1x", "strong_teacher")
ARMS = CORE + SENSITIVITY
JUDGE_NOISE = 0.3  # calibrated: misplacement ~15% on base samples (assets/testbed_base/README.md, calibrate_judge)
STRONG_TEACHER = "assets/testbed_base_strong_teacher"

_WORKDIR = flags.DEFINE_string("workdir", os.path.join(ROOT, "workdir", "replicate"), "Output directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_ARMS = flags.DEFINE_list("arms", list(ARMS), "Arms to run, in this order within each seed.")
_CONFIG = flags.DEFINE_string("config", os.path.join(ROOT, "experiments", "configs", "default.py"),
                              "The base config (the ExpRL-Outcome arm, Stage II included).")
_QUICK = flags.DEFINE_bool("quick", False, "A few steps per stage (CI-sized).")
_RESULTS = flags.DEFINE_string("results", "", "Where to write the Markdown report (default <workdir>/RESULTS.md).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rewrite the report from the runs finished in --workdir; "
                                 "train nothing.")
_ARCHIVE = flags.DEFINE_string("archive", "", "Keep what the report reads of every finished run here (e.g. "
                               "results/replication, committed); runs found here are not run again.")
# what the report reads of a finished run, and what says how it was made; checkpoints and caches stay behind
ARCHIVED_FILES = ("code.json", "summary.json", "summary.md", "stage1/metrics.jsonl", "stage1/config.json",
                  "stage1/results.json", "stage2/metrics.jsonl", "stage2/config.json", "stage2/results.json")


def archive_run(workdir: str, archived: str) -> None:
    """Copies a finished run's ARCHIVED_FILES from `workdir` to `archived`, summary.json last (it marks the run
    done)."""
    for name in sorted(ARCHIVED_FILES, key=lambda n: n == "summary.json"):
        src, dst = os.path.join(workdir, name), os.path.join(archived, name)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def code_version() -> str:
    """The commit this code is at, "+local changes" when tracked files differ from it ("unknown" outside git)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    try:
        head, status = git("rev-parse", "--short=10", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" +local changes" if status.stdout.strip() else "")


def record_code(workdir: str, version: str) -> None:
    """Appends `version` to <workdir>/code.json's list unless it is already the last one (a run resumed with other
    code lists both)."""
    path = os.path.join(workdir, "code.json")
    versions = run_code(workdir)
    if versions[-1:] != [version]:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"code": [v for v in versions if v != "unknown"] + [version]}, f)
        os.replace(path + ".tmp", path)


def run_code(workdir: str) -> list[str]:
    path = os.path.join(workdir, "code.json")
    if not os.path.exists(path):
        return ["unknown"]
    with open(path) as f:
        return json.load(f)["code"]


def _load_walls(*paths) -> dict:
    walls = {}
    for path in paths:
        if path and os.path.exists(path):
            with open(path) as f:
                walls.update(json.load(f))
    return walls


def _save_walls(walls: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(walls, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _quick(overrides: dict) -> dict:
    return {**overrides, "train.steps": 0 if overrides.get("train.steps") == 0 else 2, "stage2.steps": 2,
            "eval.num_samples": 4, "eval.final_num_samples": 8, "testbed.ladder_problems": 6,
            "testbed.num_pool": 48, "testbed.hard_filter_k": 4,
            # a quick run's caches stay in its workdir, not next to the shipped base
            "eval.cache_dir": os.path.join(_WORKDIR.value, "cache"),
            "testbed.filter_cache_dir": os.path.join(_WORKDIR.value, "cache")}


def arm_config(name: str, seed: int, quick: bool = False):
    base = load_config(_CONFIG.value, seed=seed)
    lr = base.optim.learning_rate
    # the ExpRL-Outcome arm is the default config itself (its seed-0 run is `python experiments/run.py`)
    o = {"seed": seed} if name == "exprl_outcome" else {"seed": seed, "name": name}
    if name == "base":
        o["train.steps"] = 0  # Stage II straight from the base model
    elif name in ("sft",):
        o.update({"method": "sft", "train.batch_size": 32, "train.seq_len": 256})
    elif name == "grpo":
        o["method"] = "grpo"
    elif name in ("self_distill", "strong_teacher"):
        o.update({"method": "self_distill", "optim.learning_rate": lr / 10})  # SPEC §6: 1e-7 where RL uses 1e-6
    elif name == "self_distill_lr1x":
        o["method"] = "self_distill"
    elif name == "exprl_process":
        o.update({"method": "exprl_process", "loss.ppo_mini_batch_size": 0, "process.context": "prefix"})
    elif name == "exact_step":
        o.update({"method": "exprl_process", "loss.ppo_mini_batch_size": 0, "judge.backend": "exact_step",
                  "process.mode": "group", "process.context": "prefix"})
    elif name == "wrong_reference":
        o["judge.reference"] = "other"
    elif name == "noisy_judge":
        o["judge.noise"] = JUDGE_NOISE
    elif name != "exprl_outcome":
        raise ValueError(f"unknown arm {name!r}; expected one of {ARMS}")
    if name == "strong_teacher":
        o.update({"model.hf_path": STRONG_TEACHER, "testbed.base_checkpoint": STRONG_TEACHER})
    if quick:
        o = _quick(o)
    if name == "sft":  # SPEC §6: two epochs over the Stage-I pool
        pool = load_records(load_config(_CONFIG.value, **o))[0]
        o["train.steps"] = 2 if quick else math.ceil(2 * len(pool) / 32)
    return load_config(_CONFIG.value, **o)


def minimum_detectable_effects(cfg, seeds) -> dict:
    """MDEs of the paired comparisons over `seeds`, from the base's (cached) evaluation of the first seed."""
    base = base_evaluation(cfg, evaluation_sets(cfg))
    return minimum_detectable_effects_of(base, cfg, len(seeds))


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _code_counts(results: dict) -> str:
    counts: dict = {}
    for per_seed in results.values():
        for run in per_seed.values():
            key = " then ".join(run.get("code", ["unknown"]))
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key} ({n} run{'s' * (n != 1)})" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def write_report(results: dict, path: str, command: str, wall_s: float, seeds, mde_text: str, pool_rung: str,
                 final_n: int, planned: int = 0) -> str:
    """`planned`: the number of (arm, seed) runs of the whole replication; while fewer have finished, the verdict
    is marked as not final."""
    old = open(path).read() if os.path.exists(path) else ""
    rep = rr.Replication(results, pool_rung, final_n)
    verdict, reasons = rep.verdict()
    finished = sum(len(per_seed) for per_seed in results.values())
    headline = f"**{verdict}**" if finished >= planned else (
        f"**not yet: {finished} of {planned} runs have finished.** The rule applied to them alone gives: "
        f"{verdict}.")
    pre = old[old.index(rr.PRE_START):old.index(rr.PRE_END) + len(rr.PRE_END)] if rr.PRE_START in old else (
        "(no pre-registered section was found in this file before the run)")
    lines = ["# RESULTS: the ExpRL comparison in miniature (CPU testbed)", "", f"Command: `{command}`  ",
             f"Wall time: {wall_s / 60:.1f} min (sum over the arm runs); machine: {_machine()}; seeds: "
             f"{', '.join(map(str, seeds))}.  ", f"Code the runs were made with: {_code_counts(results)}.", "", pre,
             "", "## Before any arm ran", "", mde_text, "",
             "## The verdict the pre-registered rule gives", "", headline, ""]
    lines += [f"- {r}" for r in reasons]
    lines += ["", "## After Stage I (mean ± std over seeds; M = held-out late-step accuracy)", ""]
    lines += rr.ladder_rows(rep, "stage1")
    lines += ["", "## After Stage II (sparse GRPO from each Stage-I checkpoint)", ""]
    lines += rr.ladder_rows(rep, "stage2")
    lines += ["", "## Paired differences (bootstrap 95% CIs over problems x seeds; n.s. where the CI covers 0)", ""]
    lines += rr.ci_rows(rep)
    lines += ["", "## Training dynamics (Stage I, seeds pooled)", ""] + rr.dynamics_rows(rep)
    lines += ["", "## pass@k curves on the hardest rung (mean over seeds)", ""]
    plot_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "results")
    os.makedirs(plot_dir, exist_ok=True)
    for stage in ("stage1", "stage2"):
        rr.plot(rep, stage, os.path.join(plot_dir, f"pass_at_k_{stage}.png"))
        lines.append(f"![pass@k {stage}](results/pass_at_k_{stage}.png)")
    kept = "\n" + old[old.index(rr.HAND_WRITTEN):] if rr.HAND_WRITTEN in old else "\n" + rr.HAND_WRITTEN + "\n"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + kept)
    return verdict


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    seeds = [int(s) for s in _SEEDS.value]
    unknown = set(_ARMS.value) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; expected some of {ARMS}")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    report = _RESULTS.value or os.path.join(_WORKDIR.value, "RESULTS.md")
    command = " ".join(["python", "experiments/replicate.py"] + sys.argv[1:])
    version = code_version()
    first = arm_config("base", seeds[0], _QUICK.value)
    mde_text = format_mde(minimum_detectable_effects(first, seeds))
    print(mde_text, flush=True)  # before any arm runs
    pool_rung, final_n = f"k{first.testbed.stage1_steps[-1]}", first.eval.final_num_samples
    wall_path = os.path.join(_WORKDIR.value, "wall_seconds.json")
    archive_walls = os.path.join(_ARCHIVE.value, "wall_seconds.json") if _ARCHIVE.value else ""
    walls = _load_walls(archive_walls, wall_path)
    results: dict = {arm: {} for arm in _ARMS.value}
    planned = len(seeds) * len(_ARMS.value)

    def report_now(upto_seed) -> str:
        done = {arm: per_seed for arm, per_seed in results.items() if per_seed}
        wall = sum(walls.get(f"{arm}/seed{s}", 0.0) for arm, per_seed in done.items() for s in per_seed)
        return write_report(done, report, command, wall, seeds[: seeds.index(upto_seed) + 1], mde_text, pool_rung,
                            final_n, planned)

    for seed in seeds:  # seed-major: an interrupted replication still has complete seeds
        for arm in _ARMS.value:
            cfg = arm_config(arm, seed, _QUICK.value)
            workdir = os.path.join(_WORKDIR.value, arm, f"seed{seed}")
            summary_path = os.path.join(workdir, "summary.json")
            archived = os.path.join(_ARCHIVE.value, arm, f"seed{seed}") if _ARCHIVE.value else ""
            in_archive = bool(archived) and os.path.exists(os.path.join(archived, "summary.json"))
            if not os.path.exists(summary_path) and in_archive:
                workdir, summary_path = archived, os.path.join(archived, "summary.json")  # finished elsewhere
                print(f"== {arm} seed {seed}: archived in {archived}", flush=True)
            elif _REPORT_ONLY.value and not os.path.exists(summary_path):
                continue
            elif not _REPORT_ONLY.value:
                print(f"== {arm} seed {seed}: {workdir}", flush=True)
                done_before, t0 = os.path.exists(summary_path), time.time()
                if not done_before:
                    record_code(workdir, version)
                run_pipeline(cfg, workdir)
                if not done_before:
                    walls[f"{arm}/seed{seed}"] = time.time() - t0
                    _save_walls(walls, wall_path)
            if archived and workdir != archived:
                archive_run(workdir, archived)
                _save_walls(walls, archive_walls)
            with open(summary_path) as f:
                results[arm][seed] = {"summary": json.load(f), "workdir": workdir, "config": dataclasses.asdict(cfg),
                                      "code": run_code(workdir)}
            if not _REPORT_ONLY.value:
                report_now(seed)  # after every run: a long replication can be read while it runs
        if not _REPORT_ONLY.value:
            print(f"seed {seed} done; verdict so far: {report_now(seed)}; report: {report}", flush=True)
    if _REPORT_ONLY.value:
        finished = [s for s in seeds if any(s in per_seed for per_seed in results.values())]
        if not finished:
            raise app.UsageError(f"no finished run in {_WORKDIR.value}")
        report_now(finished[-1])
    with open(report) as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
