"""Host-side row layout of device batches: mini-batches, padding rows to the mesh, micro-batches.

Any row count runs on any mesh: rows are padded with all-zero rows (no attention, no loss tokens) up to a multiple
of the batch-sharding product data×fsdp, and padded rows never reach losses, advantages, metrics or outputs.
"""
from __future__ import annotations

import numpy as np
from jax.sharding import Mesh


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways a batch's rows are split: data × fsdp (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def num_rows(batch: dict[str, np.ndarray]) -> int:
    return int(np.shape(next(iter(batch.values())))[0])


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Appends all-zero rows up to `rows`: zero masks, so they attend to nothing and carry no loss."""
    n = num_rows(batch)
    if rows < n:
        raise ValueError(f"cannot pad {n} rows down to {rows}")
    if rows == n:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def minibatches(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Splits the step batch into consecutive mini-batches of `size` rows (0 = one; size must divide N)."""
    n = num_rows(batch)
    size = size or n
    if n % size:
        raise ValueError(f"ppo_mini_batch_size={size} does not divide the step's {n} rollouts")
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def micro_rows(rows: int, micro_batch_size: int, shards: int) -> int:
    """Rows per micro-step: `micro_batch_size` (0 = all `rows`) rounded up to a multiple of `shards`."""
    return round_up(min(micro_batch_size or rows, rows), shards)


def to_micro_batches(batch: dict[str, np.ndarray], micro_batch_size: int, shards: int) -> dict[str, np.ndarray]:
    """[M, ...] -> [n, m, ...]: n micro-batches of m rows each (m a multiple of `shards`), zero rows appended to
    fill the last one. The train step accumulates gradients over the leading axis."""
    m = micro_rows(num_rows(batch), micro_batch_size, shards)
    padded = pad_rows(batch, round_up(num_rows(batch), m))
    return {k: v.reshape(-1, m, *v.shape[1:]) for k, v in padded.items()}


def chunks_of_rows(batch: dict[str, np.ndarray], chunk: int, shards: int):
    """Yields (start, rows, padded part) over `batch` in chunks of `chunk` rows (0 = all), each padded to the same
    multiple of `shards`, so one compiled program serves every chunk."""
    n = num_rows(batch)
    size = micro_rows(n, chunk, shards)
    for start in range(0, n, size):
        part = {k: v[start:start + size] for k, v in batch.items()}
        yield start, num_rows(part), pad_rows(part, size)
