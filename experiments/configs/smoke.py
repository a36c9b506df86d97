"""python experiments/run.py --config=experiments/configs/smoke.py --workdir=/tmp/exprl_smoke

The tiny model on toy addition problems: a few RL steps with a checkpoint every step, in well under a minute.
Any Stage-I method: --config.method=exprl_outcome|exprl_process|grpo|sft|self_distill (or stage2).
"""
from exprl_jax.config import default_config_dict


def get_config():
    c = default_config_dict()
    c.name = "smoke"
    c.method = "exprl_outcome"
    c.model.preset = "tiny"  # 0.1M params, character vocabulary
    c.data.source = "toy_addition"
    c.data.num_train = 64
    c.data.num_eval = 8
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 24
    c.loss.ppo_mini_batch_size = 8  # 16 rollouts per step -> 2 updates (the second one off-policy)
    c.optim.learning_rate = 1e-4
    c.judge.backend = "programmatic"  # checkpoints read from the reference; no server needed
    c.train.steps = 3
    c.train.save_every = 1
    c.train.batch_size = 8
    c.train.seq_len = 48
    c.eval.num_samples = 4
    return c
