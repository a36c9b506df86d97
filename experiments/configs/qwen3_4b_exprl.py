"""python experiments/run.py --config=experiments/configs/qwen3_4b_exprl.py --workdir=runs/qwen3_4b_outcome \
    --config.model.hf_path=/path/to/Qwen3-4B-Instruct-2507 --config.data.train_path=/path/to/d_mid.jsonl \
    --config.judge.base_url=http://judge-host:8000/v1 --config.judge.model=Qwen3-4B-Instruct-2507

The paper's ExpRL-Outcome Stage I (SPEC §5): Qwen3-4B-Instruct-2507 policy, a frozen copy of it as the judge
served by any OpenAI-compatible server, 36 prompts x 10 samples, mini-batch 18 prompts, lr 1e-6, 230 steps.
Needs accelerators (bf16); the shapes are those of `ModelConfig.qwen3_4b()`.

As shipped, per the TPU compiler (`python -m exprl_jax.plan`, commands below; GiB per chip, 2026-11-30):
  v5p-32 (fsdp 4 x tensor 4): update 27.93 peak (24.16 temporaries), reference pass 6.86, rollout prefill 26.86,
    refill 26.53, decode 26.17 (128 slots; the KV cache is 20.25); fits, 27.9 of 95; up to 360 slots fit.
  v5e-64 (fsdp 16 x tensor 4): update 7.82 (6.87 temporaries), reference pass 1.94, prefill 8.17, refill 8.20,
    decode 8.27 (KV cache 5.06); fits, 8.3 of 16; up to 272 slots fit.
"""
from exprl_jax.config import default_config_dict


def get_config():
    c = default_config_dict()
    c.name = "qwen3_4b_exprl_outcome"
    c.method = "exprl_outcome"
    c.model.preset = "qwen3_4b"  # used only when hf_path is empty (random init: shapes / throughput checks)
    c.model.tokenizer = ""  # comes with hf_path
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # Memory layout, checked by the TPU compiler (its figures are in the module docstring):
    #   python -m exprl_jax.plan --config=experiments/configs/qwen3_4b_exprl.py --topology=v5p-32
    #   python -m exprl_jax.plan --config=experiments/configs/qwen3_4b_exprl.py --topology=v5e-64
    c.mesh.shape = (1, -1, 4)  # FSDP over the rest x 4-way tensor parallelism (heads, kv heads, MLP, vocab)
    c.model.attention_impl = "auto"  # splash on TPU, cuDNN on GPU
    c.model.scan_layers = True
    c.model.remat = "full"  # keep one [rows, L, D] input per layer; recompute the rest in the backward pass
    c.model.logits_chunk = 1024  # positions per chunk of the 151,936-way vocabulary projection
    c.train.micro_batch_size = 16  # rows per micro-step (one row per 4-chip tensor group on a v5e-64)
    c.rollout.max_prompt_tokens = 2048  # the paper's prompts fit in ~2k tokens; longer ones are an error
    c.rollout.dtype = "bfloat16"  # the engine samples from a bf16, tensor-parallel copy of the policy
    c.rollout.max_concurrent_rows = 128  # KV cache slots; plan prints the largest that fits
    c.data.source = "jsonl"
    c.data.chat_template = True  # an instruction-tuned policy
    c.data.prompt_template = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    c.rollout.prompts_per_step = 36
    c.rollout.group_size = 10
    c.rollout.max_new_tokens = 16384
    c.rollout.temperature = 0.8
    c.loss.clip_high = 0.28  # the method default, written out
    c.loss.ppo_mini_batch_size = 18 * 10  # 18 prompts: the second half of each step is one update off-policy
    c.loss.kl_coef = 0.001
    c.loss.kl_kind = "k3"
    c.optim.learning_rate = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0
    c.judge.backend = "openai"
    c.judge.max_tokens = 2048
    c.judge.api_key_env = "JUDGE_API_KEY"
    c.train.steps = 230
    c.train.save_every = 10
    c.eval.num_samples = 128
    return c
