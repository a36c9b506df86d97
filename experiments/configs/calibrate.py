"""python experiments/calibrate_judge.py --config=experiments/configs/calibrate.py --out=/tmp/calibration

Judge calibration (SPEC §7, the paper's Table 5): ProcessBench traces of known correctness scored under the correct,
no and a wrong reference. The default programmatic judge only needs no server; for an LLM judge add
--config.judge.backend=openai --config.judge.base_url=http://127.0.0.1:8000/v1 --config.judge.model=<served name>.
"""
import os

import ml_collections

from exprl_jax.config import JudgeSection, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config():
    c = ml_collections.ConfigDict()
    c.judge = ml_collections.ConfigDict(to_dict(JudgeSection()))  # use_reference is set per condition, not here
    c.judge.backend = "programmatic"
    c.data_dir = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))  # holds processbench/ and references
    c.subsets = ("gsm8k", "math", "olympiadbench", "omnimath")  # ProcessBench files to use
    c.limit_per_subset = 0  # > 0: only the first n ProcessBench rows of each subset (quick checks); 0 = all
    c.seed = 0  # fixes the wrong-reference derangement
    c.mode = "outcome"  # the judge scores whole traces; correctness is known per trace, not per step
    return c
