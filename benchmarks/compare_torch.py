"""The PyTorch / Hugging Face / TRL side of benchmarks/compare.py, one task per process (started by compare.py):

  python benchmarks/compare_torch.py --task train|sample_static|sample_dynamic|rl --model-dir DIR --spec JSON \
      --out RESULT.json

train: an eager step with the loss of `exprl_jax.methods.make_ppo_loss` restated in torch (PPO clip + dual clip +
k3 KL, token-mean), AdamW and grad-norm clipping; sample_*: `model.generate` with a static / dynamic KV cache;
rl: TRL's `GRPOTrainer` configured to the job of compare_jax.py's `rl`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

import compare  # noqa: E402  (benchmarks/compare.py: the inputs both sides share)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as JAX takes its default backend on the other side
# exprl_jax's grpo defaults (config.METHOD_LOSS_DEFAULTS, LossSection): the ratio clip and the dual-clip cap
CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.26, 3.0
LOG_RATIO_BOUND, K3_BOUND = 20.0, 10.0  # losses.py's clamps


def load_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)


def ppo_loss(logprobs, old, advantages, ref, mask, kl_coef: float):
    """losses.policy_loss (token-mean, asymmetric clip, dual clip) + kl_coef * k3 KL to the reference."""
    valid = mask > 0
    count = valid.sum().clamp(min=1)
    zero = torch.zeros_like(logprobs)
    logprobs, old = torch.where(valid, logprobs, zero), torch.where(valid, old, zero)
    advantages = torch.where(valid, advantages.expand_as(logprobs), zero)
    ratio = torch.exp((logprobs - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    dual_cap = -advantages * DUAL_CLIP
    per_token = torch.where((advantages < 0) & (per_token > dual_cap), dual_cap, per_token)
    policy = torch.where(valid, per_token, zero).sum() / count
    log_ratio = (ref - logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    k3 = (torch.exp(log_ratio) - log_ratio - 1).clamp(-K3_BOUND, K3_BOUND)
    return policy + kl_coef * torch.where(valid, k3, zero).sum() / count


def train(model_dir: str, spec: dict) -> dict:
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.01)
    batch = compare.train_batch(spec, model.config.vocab_size)
    R = batch["response_mask"].shape[1]
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        b = {k: torch.from_numpy(v).to(DEVICE) for k, v in batch.items()}
        tokens = b["tokens"].long()
        # logits only where they predict response tokens, as TRL does (logits_to_keep)
        logits = model(input_ids=tokens, attention_mask=b["attention_mask"].long(), logits_to_keep=R + 1).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, -R:, None])[..., 0]
        loss = ppo_loss(logprobs, b["old_logprobs"], b["advantages"], b["ref_logprobs"], b["response_mask"],
                        spec["kl_coef"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))  # waits for the step (also on a GPU)
        times.append(time.perf_counter() - t)
    rows, length = batch["tokens"].shape
    return {"step_s": times[spec["warmup"]:], "compile_and_first_s": times[0], "tokens": rows * length,
            "first_loss": losses[0], "losses": losses, "params": sum(p.numel() for p in model.parameters())}


def sample(model_dir: str, spec: dict, cache: str | None) -> dict:
    model = load_model(model_dir)
    model.eval()
    prompts = torch.tensor(compare.sample_prompts(spec, model.config.vocab_size), device=DEVICE)
    P = prompts.shape[1]
    result = {}
    for name, new_tokens, eos in (("fixed", spec["new_tokens"], None),
                                  ("variable", spec["var_new_tokens"], compare.variable_eos_ids(spec))):
        # explicit and complete: top_k=0 (HF's default is 50) and no EOS at all for the fixed workload
        model.generation_config = GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, eos_token_id=eos,
            pad_token_id=0, cache_implementation=cache)
        seconds, counts, lengths = [], [], []
        for i in range(spec["warmup"] + spec["steps"]):
            torch.manual_seed(10 + i)
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts))
            generated = out[:, P:].cpu().numpy()
            elapsed = time.perf_counter() - t
            if eos is None:
                row_lengths = np.full(len(generated), generated.shape[1])
            else:  # up to and including the first EOS; rows that never stop fill the width
                hit = np.isin(generated, eos)
                row_lengths = np.where(hit.any(1), hit.argmax(1) + 1, generated.shape[1])
            if i >= spec["warmup"]:
                seconds.append(elapsed)
                counts.append(int(row_lengths.sum()))
                lengths += row_lengths.tolist()
        result[name] = {"seconds": seconds, "new_tokens": counts, "lengths": compare.length_stats(lengths)}
    return result


def rl(model_dir: str, spec: dict) -> dict:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    steps = spec["warmup"] + spec["steps"]
    R = spec["new_tokens"]
    seen_lengths = []

    def reward_unfinished_is_zero(completions, completion_ids, **kwargs):
        """exprl_jax's rule for a response cut at the limit (SPEC §4 Overlong: reward 0); every response of this job
        is one, on both sides."""
        seen_lengths.extend(len(c) for c in completion_ids)
        return [0.0 if len(c) >= R else 1.0 for c in completion_ids]

    class StepTimer(TrainerCallback):
        """Each step's wall time, and the time spent in the trainer's generation and in its generate-and-score
        (generation, rewards, reference log-probs): the rest of a step is the update."""
        def __init__(self):
            self.begin, self.step_s, self.parts, self.step_parts = None, [], {}, []

        def timed(self, name, fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t
            return wrapper

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin, self.parts = time.perf_counter(), {}

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.begin)
            self.step_parts.append(dict(self.parts))

    problems = compare.rl_problems(spec, spec["prompts"] * steps)
    dataset = Dataset.from_dict({"prompt": [p + "\n" for p in problems]})
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=spec["prompts"] * spec["group"],
            gradient_accumulation_steps=1, num_generations=spec["group"], max_completion_length=R,
            generation_kwargs={"min_new_tokens": R},  # exactly R new tokens, as rollout.ignore_eos on our side
            temperature=1.0, top_p=1.0, top_k=0, beta=spec["beta"], learning_rate=spec["lr"],
            lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, epsilon=CLIP_LOW,
            epsilon_high=CLIP_HIGH, loss_type="dapo",  # dapo = token-mean over the batch, as ours
            scale_rewards="group", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=DEVICE == "cpu",
            save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, shuffle_dataset=False,
            dataloader_num_workers=0, seed=0)
        trainer = GRPOTrainer(model=load_model(model_dir), reward_funcs=[reward_unfinished_is_zero], args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        trainer._generate = timer.timed("generate", trainer._generate)
        trainer._generate_and_score_completions = timer.timed("generate_and_score",
                                                              trainer._generate_and_score_completions)
        t = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t
    if not seen_lengths or min(seen_lengths) != R or max(seen_lengths) != R:
        raise RuntimeError(f"TRL completions were not all exactly {R} tokens: {sorted(set(seen_lengths))[:10]}")
    timed = list(zip(timer.step_s, timer.step_parts))[spec["warmup"]:]
    if any("generate" not in parts or "generate_and_score" not in parts for _, parts in timed):
        raise RuntimeError("TRL steps without a generation: the breakdown would be wrong (steps_per_generation?)")
    parts = {"generate": [p["generate"] for _, p in timed],
             "reward_and_reference": [p["generate_and_score"] - p["generate"] for _, p in timed],
             "update": [step - p["generate_and_score"] for step, p in timed]}
    return {"step_s": timer.step_s[spec["warmup"]:], "compile_and_first_s": timer.step_s[0],
            "breakdown_median_s": {k: float(np.median(v)) for k, v in parts.items()},
            "process_total_s": total, "completion_tokens": R}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=("train", "sample_static", "sample_dynamic", "rl"), required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec)
    if os.environ.get("EXPRL_BENCH_THREADS"):  # compare.py --threads
        torch.set_num_threads(int(os.environ["EXPRL_BENCH_THREADS"]))
    if args.task == "train":
        result = train(args.model_dir, spec)
    elif args.task.startswith("sample"):
        result = sample(args.model_dir, spec, "static" if args.task == "sample_static" else None)
    else:
        result = rl(args.model_dir, spec)
    result.update(torch_threads=torch.get_num_threads(), torch=torch.__version__, device=DEVICE)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
