"""Forward+backward time of each CPU-runnable attention implementation over a few lengths, and decode-step time
against a half-filled cache: the measurements behind the CPU rule of `attention_impl="auto"`.

  python benchmarks/attention.py [--lengths 256,512,1024,2048,4096] [--block 512] [--repeats 5]

Implementations are timed alternately in each repeat (ratios matter; the machine is shared). fp32, one device.
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from exprl_jax.models.attention import chunked_attention, xla_attention  # noqa: E402


def _inputs(B, T, S, N, K, H, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32) for _ in range(2))
    valid = np.ones((B, S), np.int32)
    valid[0, : S // 8] = 0  # some left padding
    return q, k, v, valid


def _timed(fns, args, repeats):
    """Median seconds per call of each fn, calls interleaved across fns."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _train_fns(T, block):
    slots = jnp.arange(T)

    def grad_of(attn):
        def loss(q, k, v, valid):
            return jnp.sum(attn(q, k, v, slots, valid) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    return {"xla": grad_of(xla_attention),
            "chunked": grad_of(functools.partial(chunked_attention, block_q=block, block_kv=block))}


def _decode_fns(S, block):
    slot = jnp.array([S // 2])  # one query at the middle of the cache: half of it is filled
    return {"xla": jax.jit(lambda q, k, v, valid: xla_attention(q, k, v, slot, valid)),
            "chunked": jax.jit(lambda q, k, v, valid: chunked_attention(q, k, v, slot, valid, block_q=block,
                                                                          block_kv=block))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", default="8,2,64", help="N,K,H")
    args = parser.parse_args()
    N, K, H = (int(x) for x in args.heads.split(","))
    B = args.batch
    print(f"fp32, B={B}, N={N}, K={K}, H={H}, block={args.block}, {jax.devices()[0].platform}, median of "
          f"{args.repeats}")
    print(f"{'T':>6} {'train xla ms':>13} {'chunked ms':>11} {'ratio':>6}   "
          f"{'decode S':>8} {'xla ms':>8} {'chunked ms':>11} {'ratio':>6}")
    for T in (int(x) for x in args.lengths.split(",")):
        train = _timed(_train_fns(T, args.block), _inputs(B, T, T, N, K, H), args.repeats)
        decode = _timed(_decode_fns(T, args.block), _inputs(B, 1, T, N, K, H), args.repeats)
        print(f"{T:>6} {train['xla'] * 1e3:>13.2f} {train['chunked'] * 1e3:>11.2f} "
              f"{train['chunked'] / train['xla']:>6.2f}   {T:>8} {decode['xla'] * 1e3:>8.3f} "
              f"{decode['chunked'] * 1e3:>11.3f} {decode['chunked'] / decode['xla']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
