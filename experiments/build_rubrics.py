"""Builds the per-problem rubric file once, with the judge of a run config:

  python experiments/build_rubrics.py --config=experiments/configs/qwen3_4b_exprl.py --out=data/rubrics.json

Then train with --config.judge.rubric_path=data/rubrics.json. Re-running skips problems already in the file.
"""
import asyncio
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from exprl_jax.config import ExperimentConfig, from_dict  # noqa: E402
from exprl_jax.build import load_records  # noqa: E402
from exprl_jax.judge.rubric import build_rubrics, load_rubrics, save_rubrics  # noqa: E402
from exprl_jax.rewards.factory import make_judge_backend  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (its judge and data sections).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output JSON file.", required=True)


def main(argv):
    del argv
    cfg = from_dict(ExperimentConfig, _CONFIG.value.to_dict())
    train, evals, _ = load_records(cfg)
    backend = make_judge_backend(cfg.judge, records=train)
    existing = load_rubrics(_OUT.value) if os.path.exists(_OUT.value) else {}
    rubrics, failures = asyncio.run(build_rubrics(backend, list(train) + evals, existing=existing))
    save_rubrics(_OUT.value, rubrics, template_key="rubric-builder.v1", judge_model=backend.model)
    shown = dict(list(failures.items())[:5])
    print(f"{len(rubrics)} rubrics in {_OUT.value}; {len(failures)} problems failed: {shown}")


if __name__ == "__main__":
    app.run(main)
