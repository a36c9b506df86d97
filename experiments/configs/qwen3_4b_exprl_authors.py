"""python experiments/run.py --config=experiments/configs/qwen3_4b_exprl_authors.py --workdir=runs/qwen3_4b_authors \
    --config.model.hf_path=/path/to/Qwen3-4B-Instruct-2507 --config.data.train_path=/path/to/d_mid.jsonl \
    --config.judge.base_url=http://judge-host:8000/v1 --config.judge.model=Qwen3-4B-Instruct-2507

qwen3_4b_exprl.py (ExpRL-Outcome, SPEC §5) with every place where the authors' verl fork departs from the paper
switched to the fork's behaviour (SPEC §4; WORKSPACE.md "Paper vs the authors' code"). Process:
qwen3_4b_exprl_process_authors.py. It changes exactly:
  - process.variant = "authors": segment boundaries wherever the last 10 tokens decode to text ending in `###`;
    EndNorm A_t = s_t − s_T (A_T = 0, an Overlong rollout −s_T of its judged last segment); GroupNorm's baseline
    divided by the padded length with unscored rollouts as 0; the judge also scores Overlong Process rollouts.
  - process.single_segment = "score": a one-segment DeltaNorm rollout gets +s_1.
  - loss.grpo_variant = "authors": unscored rollouts count as reward 0 in the GRPO group statistics; a group of
    one gets r / (1 + 1e-6).
  - name.
It keeps the project's behaviour where the fork's is a hazard:
  - the judge's score is read from its last line only, and an out-of-range or malformed score leaves the rollout
    unscored; the fork reads the first character after the first `Score:` (so `Score: 10` → 1 → 0.0, `Score: 7`
    → 1.5, a quoted `Score:` in the reasoning wins) (SPEC §3, §9);
  - a rollout with a failed step is always dropped from the loss; the fork's DeltaNorm shifts its −100 marker
    when the failed step is the first one and trains on advantage −100 − s_T (SPEC §9);
  - an Outcome rollout that hits the length limit gets 0 without a judge call (the fork calls the judge and drops
    the rollout when the answer is unparseable).
Not reproduced: the fork's token-mean per micro-batch under dynamic batch size (a token's weight depends on its
micro-batch; the project normalises over the whole mini-batch, SPEC §5) and its length-balanced reordering of
rollouts before the mini-batch split. Like the fork, the old log-probs come from the training forward (the base
config samples in bf16, so rollout.recompute_logprobs="auto" recomputes them).
"""
import os

from exprl_jax.config import config_from_file


def get_config():
    c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_4b_exprl.py"))
    c.name = "qwen3_4b_exprl_outcome_authors"
    c.process.variant = "authors"
    c.process.single_segment = "score"
    c.loss.grpo_variant = "authors"
    return c
