"""Scores traces of known correctness under the correct, no and a wrong reference (SPEC §7) and writes the
misplacement table (calibration.md, calibration.json) to --out.

  python experiments/calibrate_judge.py --config=experiments/configs/calibrate.py --out=/tmp/calibration \
      --config.judge.backend=openai --config.judge.base_url=http://127.0.0.1:8000/v1 --config.judge.model=Qwen3-4B
  python experiments/calibrate_judge.py --config=experiments/configs/calibrate.py:testbed --out=/tmp/calibration

The second form calibrates the programmatic judge's noise knob on the testbed base's own samples: one table per
`noise_grid` value (the paper's LLM judges: 10-19% misplacement with the right reference).
"""
import asyncio
import logging as std_logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from exprl_jax.config import from_dict, to_dict  # noqa: E402
from exprl_jax.judge.calibration import (  # noqa: E402
    CalibrationConfig, acalibrate, format_table, load_processbench, write_table)
from exprl_jax.judge.reward import JudgeReward  # noqa: E402
from exprl_jax.rewards.factory import make_judge_backend  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "experiments", "configs", "calibrate.py"), "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: workdir/calibration/<judge model>).")


async def _calibrate(items, judge_cfg, mode: str, seed: int, out_dir: str) -> dict:
    from exprl_jax.judge import JudgeCache, JudgeStats

    backend = make_judge_backend(judge_cfg)
    cache = JudgeCache(os.path.join(out_dir, "judge_cache")) if judge_cfg.cache else None
    make_judge = lambda use_reference: JudgeReward(  # noqa: E731
        backend, mode=mode, cache=cache, stats=JudgeStats(), use_reference=use_reference)
    try:
        return await acalibrate(items, make_judge, seed=seed)
    finally:
        await backend.aclose()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    std_logging.getLogger("exprl_jax").setLevel(std_logging.INFO)
    cfg = from_dict(CalibrationConfig, _CONFIG.value.to_dict())
    judge_cfg = cfg.judge
    if judge_cfg.rubric_path:
        raise app.UsageError("config.judge.rubric_path is not supported by calibration (a stored rubric comes from "
                             "the correct reference, which would leak into the no/wrong-reference conditions)")
    out_dir = _OUT.value or os.path.join(ROOT, "workdir", "calibration", judge_cfg.model or judge_cfg.backend)
    if cfg.source == "testbed":
        return _calibrate_testbed(cfg, out_dir)
    if not os.path.isdir(os.path.join(cfg.data_dir, "processbench")):
        raise app.UsageError(f"config.data_dir={cfg.data_dir!r} has no processbench/ folder")
    items, join_stats = load_processbench(cfg.data_dir, cfg.subsets, cfg.limit_per_subset or None)
    if not items:
        raise app.UsageError(f"no ProcessBench row joined to a reference under {cfg.data_dir}: {join_stats}")
    logging.info("calibrating on %d traces (join: %s)", len(items), join_stats["total"])
    result = asyncio.run(_calibrate(items, judge_cfg, cfg.mode, cfg.seed, out_dir))
    result["join"] = join_stats
    result["config"] = to_dict(cfg)
    md_path, json_path = write_table(result, out_dir)
    print(format_table(result))
    print(f"join: {join_stats['total']['joined']} of {join_stats['total']['rows']} ProcessBench rows "
          f"({join_stats['total']['unjoined']} without an exact-text reference)")
    print(f"wrote {md_path} and {json_path}")


def _calibrate_testbed(cfg, out_dir: str) -> None:
    """The base's own samples of held-out chains, scored once per noise value of the grid."""
    import dataclasses
    import json

    import jax

    from exprl_jax.tasks import probes

    items = probes.calibration_items(probes.Base.load(cfg.testbed_base), cfg.testbed_steps, cfg.testbed_problems,
                                     cfg.testbed_samples, jax.random.key(cfg.seed))
    results, tables = {}, []
    for noise in cfg.noise_grid or (cfg.judge.noise,):
        judge_cfg = dataclasses.replace(cfg.judge, noise=noise, cache=False)
        result = asyncio.run(_calibrate(items, judge_cfg, cfg.mode, cfg.seed, out_dir))
        result["source"] = "testbed-base"
        results[str(noise)] = result
        tables.append(f"### judge noise {noise:g}\n\n" + format_table(result))
    summary = ["| judge noise | misplacement, right reference | no reference | wrong reference |", "|---|---|---|---|"]
    for noise, result in results.items():
        c = result["conditions"]
        summary.append(f"| {float(noise):g} | " + " | ".join(f"{100 * c[k]['misplacement']:.1f}%" for k in
                                                            ("correct_ref", "no_ref", "wrong_ref")) + " |")
    text = (f"Testbed base {cfg.testbed_base}: {len(items)} own samples of chains k = {list(cfg.testbed_steps)} "
            f"({sum(i.correct for i in items)} correct).\n\n" + "\n".join(summary) + "\n\n" + "\n".join(tables))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "calibration.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "calibration.json"), "w") as f:
        json.dump({noise: {k: v for k, v in r.items() if k != "rows"} for noise, r in results.items()}, f,
                  indent=1, default=str)
    print(text)


if __name__ == "__main__":
    app.run(main)
