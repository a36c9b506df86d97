"""The exprl_jax side of benchmarks/compare.py, one task per process (started by compare.py, not by hand):

  python benchmarks/compare_jax.py --task train|sample|rl --model-dir DIR --spec JSON --out RESULT.json

train: the project's jitted step (`make_train_step` around `methods.make_loss_fn("grpo")`: PPO clip + dual clip + k3
KL, AdamW, grad clip); sample: the public `exprl_jax.generate` (sample_quarter_slots: with a quarter of the rows in
cache slots at a time; sample_fixed_batch: the sampler it replaced); rl: whole steps of `Experiment` (method grpo), the
same code path as `experiments/run.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import compare  # noqa: E402  (benchmarks/compare.py: the inputs both sides share)
import exprl_jax as ex  # noqa: E402
from exprl_jax.build import enable_compilation_cache, keep_freed_host_memory  # noqa: E402


def train(model_dir: str, spec: dict) -> dict:
    from exprl_jax import config as config_lib
    from exprl_jax import sharding as shd
    from exprl_jax.batching import to_micro_batches
    from exprl_jax.methods import batch_ndims, loss_mask_key, make_loss_fn
    from exprl_jax.train_state import OptimConfig, init_train_state, make_optimizer, make_train_step

    model_cfg, params = ex.load_hf(model_dir)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    cfg = config_lib.resolve(config_lib.ExperimentConfig(
        method="grpo", loss=config_lib.LossSection(kl_coef=spec["kl_coef"])))
    optimizer = make_optimizer(OptimConfig(learning_rate=spec["lr"]))
    state, shardings = init_train_state(model_cfg, optimizer, jax.random.key(0), mesh, params=params)
    step = make_train_step(make_loss_fn("grpo", model_cfg, cfg.loss, 1.0), optimizer, shardings, mesh,
                           batch_ndims("grpo"), loss_mask_key("grpo"))
    batch = compare.train_batch(spec, model_cfg.vocab_size)
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        device_batch = shd.shard_batch(to_micro_batches(batch, 0, 1), mesh, leading_axes=1)
        state, metrics = step(state, device_batch, jax.random.fold_in(jax.random.key(1), i))
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss/total"]))
    rows, length = batch["tokens"].shape
    return {"step_s": times[spec["warmup"]:], "compile_and_first_s": times[0], "tokens": rows * length,
            "first_loss": losses[0], "losses": losses, "devices": str(jax.devices()[0]),
            "params": sum(x.size for x in jax.tree.leaves(state.params))}


def sample(model_dir: str, spec: dict, sampler: str = "engine") -> dict:
    """`sampler`: "engine" (`exprl_jax.generate`, all rows at once), "engine_quarter_slots" (the engine with
    max_concurrent_rows = a quarter of the rows: finished rows are refilled) or "fixed_batch" (the sampler the
    engine replaced). Also records each run's share of wasted decode compute (slot-steps spent on finished rows)."""
    from exprl_jax.sampling import generate_fixed_batch

    model_cfg, params = ex.load_hf(model_dir)
    prompts = compare.sample_prompts(spec, model_cfg.vocab_size)
    result = {}
    for name, new_tokens, eos in (("fixed", spec["new_tokens"], ()),
                                  ("variable", spec["var_new_tokens"], compare.variable_eos_ids(spec))):
        seconds, counts, lengths, waste = [], [], [], []
        for i in range(spec["warmup"] + spec["steps"]):
            kwargs = dict(max_new_tokens=new_tokens, temperature=1.0, eos_ids=eos, pad_id=0)
            t = time.perf_counter()
            if sampler == "fixed_batch":
                out = generate_fixed_batch(model_cfg, params, prompts, jax.random.key(10 + i), **kwargs)
            else:
                slots = max(1, len(prompts) // 4) if sampler == "engine_quarter_slots" else 0
                out = ex.generate(model_cfg, params, prompts, jax.random.key(10 + i), max_concurrent_rows=slots,
                                  **kwargs)
            out = out.to_numpy()  # on the host, as HF's
            elapsed = time.perf_counter() - t
            if i >= spec["warmup"]:
                seconds.append(elapsed)
                counts.append(int(out.lengths.sum()))  # generated tokens only (a sampled EOS counts)
                lengths += out.lengths.tolist()
                # a fixed batch computes every row until the longest ends; the engine counts its slot-steps
                waste.append(1.0 - (out.slot_utilisation if sampler != "fixed_batch"
                                    else out.lengths.sum() / (len(out.lengths) * out.lengths.max())))
        result[name] = {"seconds": seconds, "new_tokens": counts, "lengths": compare.length_stats(lengths),
                        "waste": waste}
    return result


def rl(model_dir: str, spec: dict) -> dict:
    from exprl_jax.config import load_config
    from exprl_jax.data import QARecord, write_jsonl
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train.jsonl")
        problems = compare.rl_problems(spec, spec["prompts"] * steps)
        write_jsonl(data, [QARecord(id=f"p{i}", problem=p, reference="0", answer="0") for i, p in enumerate(problems)])
        overrides = {
            "method": "grpo", "model.hf_path": model_dir, "data.source": "jsonl", "data.train_path": data,
            "data.shuffle": False, "data.prompt_template": "{problem}\n", "data.num_eval": 0,
            "rollout.prompts_per_step": spec["prompts"], "rollout.group_size": spec["group"],
            "rollout.max_new_tokens": spec["new_tokens"], "rollout.ignore_eos": True, "rollout.temperature": 1.0,
            "loss.kl_coef": spec["beta"], "loss.ppo_mini_batch_size": 0, "optim.learning_rate": spec["lr"],
            "train.steps": steps,
            "train.save_every": 10 ** 9, "train.log_every": 1, "eval.at_start": False, "eval.at_end": False}
        cfg = load_config(os.path.join(compare.ROOT, "experiments", "configs", "smoke.py"), **overrides)
        workdir = os.path.join(tmp, "run")
        t = time.perf_counter()
        results = Experiment(cfg, workdir).run()
        total = time.perf_counter() - t
        rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss/total" in r]
    timed = rows[spec["warmup"]:]
    parts = ("time/sample_s", "time/reward_s", "time/device_while_judging_s", "time/update_s")
    return {"step_s": [r["time/step_s"] for r in timed],
            "breakdown_median_s": {k: float(np.median([r[k] for r in timed])) for k in parts},
            "response_length_mean": float(np.mean([r["response/length_mean"] for r in timed])),
            "compile_and_first_s": rows[0]["time/step_s"], "train_seconds": results["train_seconds"],
            "process_total_s": total}


TASKS = {"train": train, "sample": sample, "rl": rl,
         "sample_fixed_batch": lambda d, s: sample(d, s, "fixed_batch"),
         "sample_quarter_slots": lambda d, s: sample(d, s, "engine_quarter_slots")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    keep_freed_host_memory()  # as experiments/run.py does, before any device use
    enable_compilation_cache()  # likewise; compilation is excluded from the timings anyway
    result = TASKS[args.task](args.model_dir, json.loads(args.spec))
    result["backend"] = jax.default_backend()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
