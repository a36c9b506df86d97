"""python experiments/run.py --config=experiments/configs/qwen3_8b_exprl.py --workdir=runs/qwen3_8b_outcome \
    --config.model.hf_path=/path/to/Qwen3-8B --config.data.train_path=/path/to/d_mid_mixed.jsonl \
    --config.judge.base_url=http://judge-host:8000/v1 --config.judge.model=Qwen3-4B-Instruct-2507

The paper's mixed-domain ExpRL-Outcome Stage I (SPEC §8): a Qwen3-8B policy judged by a Qwen3-4B judge served by
any OpenAI-compatible server, with judge outputs up to 4096 tokens (SPEC §3); everything else as in
qwen3_4b_exprl.py. Memory layout checked by the TPU compiler:
  python -m exprl_jax.plan --config=experiments/configs/qwen3_8b_exprl.py --topology=v5p-64
As shipped (fsdp 8 x tensor 4; GiB per chip, 2026-11-30): update 25.77 peak (21.94 temporaries), reference pass
6.33, rollout prefill 18.38, refill 18.12, decode 18.21 (128 slots; KV cache 10.12); fits, 25.8 of 95.
"""
import os

from exprl_jax.config import config_from_file


def get_config():
    c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_4b_exprl.py"))
    c.name = "qwen3_8b_exprl_outcome"
    c.model.preset = "qwen3_8b"  # used only when hf_path is empty (random init: shapes / memory checks)
    c.judge.max_tokens = 4096
    c.train.micro_batch_size = 16  # on a v5p-64 (32 chips, mesh 1 x 8 x 4): two rows per 4-chip tensor group
    return c
