"""The data cursor: which records step s trains on, as a pure function of (seed, step), so a resumed run continues
exactly. The global batch of a step is the same for any number of processes; each process takes its contiguous
share of it (process i of n: rows [i·B/n, (i+1)·B/n)), so only that share is ever read from a lazy source.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def step_indices(num_records: int, per_step: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Record indices of step `step` in the endless sequence of per-epoch permutations (epoch e is
    `default_rng([seed, e]).permutation(num_records)`)."""
    if num_records <= 0:
        raise ValueError("the data cursor needs at least one record")
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, num_records)
        order = np.random.default_rng([seed, epoch]).permutation(num_records) if shuffle else np.arange(num_records)
        out.append(int(order[offset]))
    return out


def process_share(indices: Sequence[int], process_index: int = 0, process_count: int = 1) -> list[int]:
    """Process `process_index`'s contiguous share of one step's global indices (the batch must divide evenly)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(indices) % process_count:
        raise ValueError(f"{len(indices)} records per step do not split evenly over {process_count} processes")
    per_process = len(indices) // process_count
    return list(indices[process_index * per_process:(process_index + 1) * per_process])


def indices_at(records: Sequence, per_step: int, step: int, seed: int, shuffle: bool = True, *,
               process_index: int = 0, process_count: int = 1) -> list[int]:
    """This process's record indices for `step`. A mixture (anything with `global_indices`) draws by its domain
    weights; any other sequence of records uses `step_indices`."""
    draw = getattr(records, "global_indices", None)
    if draw is not None:
        full = draw(per_step, step, seed, shuffle)
    else:
        full = step_indices(len(records), per_step, step, seed, shuffle)
    return process_share(full, process_index, process_count)


def records_at(records: Sequence, per_step: int, step: int, seed: int, shuffle: bool = True, *,
               process_index: int = 0, process_count: int = 1) -> list:
    """This process's records for `step` (see `indices_at`); a lazy source reads only these rows."""
    return [records[i] for i in indices_at(records, per_step, step, seed, shuffle, process_index=process_index,
                                           process_count=process_count)]
