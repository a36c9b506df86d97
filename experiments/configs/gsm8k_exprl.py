"""python experiments/run.py --config=experiments/configs/gsm8k_exprl.py --workdir=/tmp/gsm8k_exprl

ExpRL-Outcome on GSM8K (exprl_qa/gsm8k through TFDS) with a judge served over the OpenAI-compatible API.

The command above is the CPU proof of the whole path (a tiny random policy, a few steps), with the tiny stand-in
judge (assets/tiny_judge) served in another terminal first:
  python -m exprl_jax.serve --model assets/tiny_judge --port 8000

A real run (the paper's Stage-I settings, SPEC §5; accelerators), the judge a frozen copy of the policy:
  python -m exprl_jax.serve --model /path/to/Qwen3-4B-Instruct-2507 --port 8000 --max-tokens 2048
  python experiments/run.py --config=experiments/configs/gsm8k_exprl.py:real --workdir=runs/gsm8k_exprl \
      --config.model.hf_path=/path/to/Qwen3-4B-Instruct-2507 --config.judge.model=Qwen3-4B-Instruct-2507
(any OpenAI-compatible server works: set --config.judge.base_url and, for a key, --config.judge.api_key_env).
The exprl_qa/gsm8k TFDS config is built from ../shared/data on first use (python -m exprl_jax.data.build_tfds).
"""
import importlib.util
import os


def get_config(arg: str = "cpu"):
    c = paper_config() if arg == "real" else cpu_config()
    c.name = f"gsm8k_exprl_{arg}"
    c.data.source = "tfds"
    c.data.tfds_name = "exprl_qa/gsm8k"  # train 7,473 / test 1,319
    c.data.tfds_train_split = "train"
    c.data.tfds_eval_split = "test"
    c.data.answer_style = "auto"  # \boxed{} when the policy writes one, else GSM8K's "#### " line
    return c


def cpu_config():
    """A few steps of a tiny random policy on real problems, judged by the served tiny judge."""
    from exprl_jax.config import default_config_dict

    c = default_config_dict()
    c.method = "exprl_outcome"
    c.model.preset = "tiny"  # 0.1M parameters, character vocabulary
    c.data.prompt_template = "{problem}\n"
    c.data.num_eval = 4
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 24  # a random policy ends about a fifth of its rollouts with EOS: those are judged
    c.rollout.temperature = 1.0
    c.loss.ppo_mini_batch_size = 8
    c.optim.learning_rate = 1e-4
    c.judge.backend = "openai"
    c.judge.base_url = "http://127.0.0.1:8000/v1"  # python -m exprl_jax.serve --model assets/tiny_judge --port 8000
    c.judge.model = "tiny_judge"  # the served name (the model directory's name)
    c.judge.max_tokens = 48  # the tiny judge answers in about 30 characters
    c.judge.max_concurrency = 16
    c.judge.timeout_s = 300.0
    c.train.steps = 3
    c.train.save_every = 1
    c.eval.at_start = False
    c.eval.num_samples = 2
    return c


def paper_config():
    """The paper's Stage-I settings (experiments/configs/qwen3_4b_exprl.py) with the judge on this host."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_4b_exprl.py")
    spec = importlib.util.spec_from_file_location("qwen3_4b_exprl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.judge.base_url = "http://127.0.0.1:8000/v1"
    c.judge.api_key_env = ""  # python -m exprl_jax.serve takes no key
    c.eval.num_samples = 16
    return c
