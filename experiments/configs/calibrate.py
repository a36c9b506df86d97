"""python experiments/calibrate_judge.py --config=experiments/configs/calibrate.py --out=/tmp/calibration

Judge calibration (SPEC §7, the paper's Table 5): ProcessBench traces of known correctness scored under the correct,
no and a wrong reference. The default programmatic judge only needs no server; for an LLM judge add
--config.judge.backend=openai --config.judge.base_url=http://127.0.0.1:8000/v1 --config.judge.model=<served name>.
`--config=experiments/configs/calibrate.py:testbed` calibrates the programmatic judge's noise knob instead, on
the testbed base's own samples (`noise_grid`).
"""
import os

import ml_collections

from exprl_jax.config import JudgeSection, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config(source: str = "processbench"):
    c = ml_collections.ConfigDict()
    c.judge = ml_collections.ConfigDict(to_dict(JudgeSection()))  # use_reference is set per condition, not here
    c.judge.backend = "programmatic"
    c.data_dir = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))  # holds processbench/ and references
    c.subsets = ("gsm8k", "math", "olympiadbench", "omnimath")  # ProcessBench files to use
    c.limit_per_subset = 0  # > 0: only the first n ProcessBench rows of each subset (quick checks); 0 = all
    c.seed = 0  # fixes the wrong-reference derangement
    c.mode = "outcome"  # the judge scores whole traces; correctness is known per trace, not per step
    c.source = source  # "testbed" (config file argument `:testbed`): the testbed base's own samples
    c.testbed_base = "assets/testbed_base"
    c.testbed_steps = (4, 5, 6, 7)  # from mostly right to mostly wrong: both classes occur
    c.testbed_problems = 64  # per chain length
    c.testbed_samples = 2  # per problem
    c.noise_grid = (0.0, 0.2, 0.3, 0.4) if source == "testbed" else ()  # programmatic judge noise values to try
    return c
