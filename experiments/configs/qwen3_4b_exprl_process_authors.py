"""python experiments/run.py --config=experiments/configs/qwen3_4b_exprl_process_authors.py \
    --workdir=runs/qwen3_4b_process_authors --config.model.hf_path=/path/to/Qwen3-4B-Instruct-2507 \
    --config.data.train_path=/path/to/d_mid.jsonl --config.judge.base_url=http://judge-host:8000/v1 \
    --config.judge.model=Qwen3-4B-Instruct-2507

ExpRL-Process (DeltaNorm) as the authors' scripts run it: qwen3_4b_exprl_authors.py (every authors' variant on;
its docstring lists what that changes and keeps) with the Process scripts' settings: 16 samples per prompt, the
whole 36-prompt batch in one update (fully on-policy), clip_high 0.26, the judge's Process template scoring each
segment alone. EndNorm / GroupNorm: --config.process.mode=end|group.
"""
import os

from exprl_jax.config import config_from_file


def get_config():
    c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_4b_exprl_authors.py"))
    c.name = "qwen3_4b_exprl_process_authors"
    c.method = "exprl_process"
    c.process.mode = "delta"
    c.process.context = "segment"
    c.rollout.group_size = 16
    c.loss.clip_high = 0.26
    c.loss.ppo_mini_batch_size = 36 * 16  # the whole step batch
    return c
