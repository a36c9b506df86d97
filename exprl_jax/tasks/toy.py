"""Two-number addition with a worked reference: the smallest real QA-with-reference task, for smoke runs."""
from __future__ import annotations

import numpy as np

from exprl_jax.data import QARecord


def addition_records(n: int, seed: int, max_value: int = 99) -> list[QARecord]:
    """`n` deterministic problems "a+b=?" with a short reference that ends in \\boxed{answer}."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, max_value + 1, size=2))
        records.append(QARecord(
            id=f"toy_addition/{seed}/{i}",
            problem=f"{a}+{b}=?",
            reference=f"{a}+{b}={a + b}###\\boxed{{{a + b}}}",
            answer=str(a + b),
            domain="math",
        ))
    return records
