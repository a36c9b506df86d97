"""python experiments/run.py --config=experiments/configs/math_exprl.py --workdir=/tmp/math_exprl

ExpRL-Outcome on MATH (exprl_qa/math through TFDS: 4,500 training problems, MATH-500 held out) with a judge
served over the OpenAI-compatible API; everything but the data is experiments/configs/gsm8k_exprl.py.

The command above is the CPU proof of the whole path (a tiny random policy, a few steps), with the tiny stand-in
judge (assets/tiny_judge) served in another terminal first:
  python -m exprl_jax.serve --model assets/tiny_judge --port 8000

A real run (the paper's Stage-I settings, SPEC §5; accelerators), the judge a frozen copy of the policy:
  python -m exprl_jax.serve --model /path/to/Qwen3-4B-Instruct-2507 --port 8000 --max-tokens 2048
  python experiments/run.py --config=experiments/configs/math_exprl.py:real --workdir=runs/math_exprl \
      --config.model.hf_path=/path/to/Qwen3-4B-Instruct-2507 --config.judge.model=Qwen3-4B-Instruct-2507
(any OpenAI-compatible server works: set --config.judge.base_url and, for a key, --config.judge.api_key_env).
The exprl_qa/math TFDS config is built from ../shared/data on first use (python -m exprl_jax.data.build_tfds).
"""
import os

from exprl_jax.config import config_from_file


def get_config(arg: str = "cpu"):
    c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_exprl.py"), arg)
    c.name = f"math_exprl_{arg}"
    c.data.tfds_name = "exprl_qa/math"  # train 4,500 (MATH test minus MATH-500) / test 500 (MATH-500)
    c.data.answer_style = "boxed"  # MATH references end in \boxed{}
    return c
