"""Scores ProcessBench traces of known correctness under the correct, no and a wrong reference (SPEC §7) and writes
the misplacement table (calibration.md, calibration.json) to --out.

  python experiments/calibrate_judge.py --config=experiments/configs/calibrate.py --out=/tmp/calibration \
      --config.judge.backend=openai --config.judge.base_url=http://127.0.0.1:8000/v1 --config.judge.model=Qwen3-4B
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
    if not os.path.isdir(os.path.join(cfg.data_dir, "processbench")):
        raise app.UsageError(f"config.data_dir={cfg.data_dir!r} has no processbench/ folder")
    items, join_stats = load_processbench(cfg.data_dir, cfg.subsets, cfg.limit_per_subset or None)
    if not items:
        raise app.UsageError(f"no ProcessBench row joined to a reference under {cfg.data_dir}: {join_stats}")
    out_dir = _OUT.value or os.path.join(ROOT, "workdir", "calibration", judge_cfg.model or judge_cfg.backend)
    logging.info("calibrating on %d traces (join: %s)", len(items), join_stats["total"])
    result = asyncio.run(_calibrate(items, judge_cfg, cfg.mode, cfg.seed, out_dir))
    result["join"] = join_stats
    result["config"] = to_dict(cfg)
    md_path, json_path = write_table(result, out_dir)
    print(format_table(result))
    print(f"join: {join_stats['total']['joined']} of {join_stats['total']['rows']} ProcessBench rows "
          f"({join_stats['total']['unjoined']} without an exact-text reference)")
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    app.run(main)
