"""Prints tokens/s of the jitted train step and of the KV-cache sampler on this machine (single device).

  python benchmarks/throughput.py [--size tiny|small] [--repeats 5]

`small` is the 4.46M-parameter shape of ../shared/ENV_NOTES.md (d 256, 4 layers, vocab 512), for comparison.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from exprl_jax import sharding as shd  # noqa: E402
from exprl_jax.models.config import ModelConfig  # noqa: E402
from exprl_jax.models.transformer import token_logprobs  # noqa: E402
from exprl_jax.sampling import generate  # noqa: E402
from exprl_jax.train_state import OptimConfig, init_train_state, make_optimizer, make_train_step  # noqa: E402

SIZES = {
    "tiny": ModelConfig.tiny(),
    "small": ModelConfig.tiny(vocab_size=512, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                              mlp_dim=1024, qk_norm=False, family="llama"),
}


def bench(fn, repeats):
    fn()  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = SIZES[args.size]
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-4))
    state, shardings = init_train_state(cfg, optimizer, jax.random.key(0), mesh)

    def loss_fn(params, batch, rng, denominators):
        lp = token_logprobs(cfg, params, batch["tokens"], attention_mask=batch["attention_mask"])
        loss = -lp.mean()
        return loss, {}

    step = make_train_step(loss_fn, optimizer, shardings, mesh, {"tokens": 2, "attention_mask": 2},
                           mask_key="attention_mask")
    B, T = 16, 256
    rng = np.random.default_rng(0)
    batch = shd.shard_batch({"tokens": rng.integers(4, cfg.vocab_size, (1, B, T)).astype(np.int32),
                             "attention_mask": np.ones((1, B, T), np.int32)}, mesh, leading_axes=1)
    holder = {"state": state}

    def train_once():
        holder["state"], m = step(holder["state"], batch, jax.random.key(1))
        jax.block_until_ready(m)

    train_s = bench(train_once, args.repeats)
    prompts = [list(rng.integers(4, cfg.vocab_size, 16)) for _ in range(32)]
    new_tokens = 128

    def sample_once():
        out = generate(cfg, holder["state"].params, prompts, jax.random.key(2), max_new_tokens=new_tokens)
        jax.block_until_ready(out.tokens)

    sample_s = bench(sample_once, args.repeats)
    n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
    print(f"model={args.size} params={n_params / 1e6:.2f}M devices=1 backend={jax.default_backend()}")
    print(f"train step  {B}x{T} tokens, AdamW: {train_s * 1e3:8.1f} ms/step  {B * T / train_s:10.0f} tok/s")
    print(f"sampler     32 prompts x {new_tokens} new: {sample_s * 1e3:8.1f} ms       "
          f"{32 * new_tokens / sample_s:10.0f} new tok/s")


if __name__ == "__main__":
    main()
