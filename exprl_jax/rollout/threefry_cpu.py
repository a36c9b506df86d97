"""The Threefry-2x32 hash written out round by round on the CPU backend, as JAX already lowers it on GPU and TPU.

JAX lowers `threefry2x32` on CPU as a 5-iteration loop (smaller programs, faster compiles). Inside the decode loop
that loop runs for every row's Gumbel noise and key at every generated token: at the bench shape (32 rows, a
512-token vocabulary) the sampler took ~2x longer than with the straight-line hash. The hash is the same function
(Random123's Threefry-2x32 with 20 rounds; uint32 additions and xors are exact), so every random stream, and so
every sampled token, is bitwise unchanged: tests/test_sampling.py checks the known-answer vectors.

`unroll_threefry_on_cpu()` swaps the CPU lowering for the process (JAX has one lowering per primitive and
platform); programs compiled before the call keep theirs. The sampler calls it while tracing a sampling step.
"""
from __future__ import annotations

import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_installed = False


def _rotate_left(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32_unrolled(key1, key2, x1, x2):
    """Threefry-2x32, 20 rounds with a key injection after every 4 (uint32 arrays of one shape)."""
    keys = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1, x2 = x1 + keys[(i + 1) % 3], x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def unroll_threefry_on_cpu() -> None:
    """Lower `threefry2x32` on CPU with the straight-line hash from now on (idempotent)."""
    global _installed
    if not _installed:
        mlir.register_lowering(threefry2x32_p, mlir.lower_fun(lambda *args: threefry2x32_unrolled(*args),
                                                              multiple_results=True), platform="cpu")
        _installed = True
