"""python experiments/run.py --config=experiments/configs/testbed_pretrain.py --workdir=/tmp/testbed_pretrain
then: python experiments/run.py --config=experiments/configs/testbed_pretrain.py:teacher \
        --workdir=/tmp/testbed_pretrain_teacher --config.model.init_checkpoint=/tmp/testbed_pretrain

Pre-training of the CPU testbed's shared base (assets/testbed_base; its README records the run): SFT of a tiny
Qwen3-shaped model (0.92M params, character vocabulary) on native traces of mod-10 chain problems.
Phase "base" (default): short chains, k = 1..4 plus a long_frac share of k = 5..6, in 176-token sequences.
Phase "teacher": a shorter continuation at a lower lr with the same native mix, in which 10% of the items put the
reference solution in the prompt (the self-distillation teacher's format, SPEC §6), all at k <= 6, so that the
teacher can read a reference but has seen no chain longer than the student has. Those prompts need 432-token
sequences, which is why they are not mixed into the ~3x cheaper per-step base phase.
"""
from exprl_jax.config import default_config_dict


def get_config(phase: str = "base"):
    if phase not in ("base", "teacher"):
        raise ValueError(f"phase must be 'base' or 'teacher', got {phase!r}")
    c = default_config_dict()
    c.name = f"testbed_pretrain_{phase}"
    c.seed = 0
    c.method = "sft"
    c.model.preset = "tiny"
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 32
    c.model.mlp_dim = 384
    c.data.source = "testbed"
    c.data.answer_style = "boxed"
    c.data.num_eval = 64  # the "easy" held-out set (k = 1..4)
    c.testbed.view = "pretrain"
    c.testbed.pretrain_steps = (1, 2, 3, 4)
    c.testbed.long_steps = (5, 6)
    c.testbed.long_frac = 0.1
    c.testbed.num_pretrain = 131072
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0
    c.train.log_every = 10
    c.train.save_every = 100
    c.train.keep_checkpoints = 2
    c.rollout.max_new_tokens = 112  # the longest k = 4 native trace is 67 characters
    c.eval.at_start = False
    c.eval.num_samples = 8
    if phase == "base":
        c.testbed.reference_prompt_frac = 0.0
        c.optim.learning_rate = 2e-3
        c.optim.warmup_steps = 100
        c.train.steps = 1500
        c.optim.decay_steps = 1500
        c.train.batch_size = 64
        c.train.seq_len = 176  # the longest k = 6 item (prompt + native trace + EOS) is 164
    else:
        c.model.init_checkpoint = "/tmp/testbed_pretrain"
        c.testbed.reference_prompt_frac = 0.1  # at most 10% of the items, in this phase and overall
        c.testbed.reference_prompt_steps = (1, 2, 3, 4, 5, 6)  # never longer than the native chains
        c.testbed.long_frac = 0.09  # the native 90% keep the base phase's mix (10% of them at k = 5..6)
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 20
        c.train.steps = 400
        c.optim.decay_steps = 400
        c.train.batch_size = 32
        c.train.seq_len = 432  # the longest k = 6 reference-conditioned item is 421
    return c
