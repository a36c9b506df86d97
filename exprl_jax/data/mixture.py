"""Mixed-domain data (SPEC §8's math + science + code run): several sources pooled, grouped by record domain, and
drawn by per-domain sampling weights. Step s's draws are a pure function of (seed, s), so resume stays exact.

Positions of the endless draw sequence are dealt to domains by a fixed interleave with exact long-run proportions
(`interleave`); a domain's m-th draw is record m mod n of its own per-epoch permutation, epoch m // n.
"""
from __future__ import annotations

import fractions
import functools
import math
import os
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from exprl_jax.data.records import QARecord

DEFAULT_DOMAIN = "math"  # the domain of a record that names none
_COMPONENT = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<split>.+)\])?$")


def parse_weights(entries: Sequence[str]) -> dict[str, float]:
    """("math=0.6", "science=0.4") -> {"math": 0.6, "science": 0.4}, checked (positive, no repeats)."""
    weights: dict[str, float] = {}
    for entry in entries:
        domain, sep, value = entry.partition("=")
        domain = domain.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not domain or not weight > 0 or not math.isfinite(weight) or domain in weights:
            raise ValueError(f"config.data.domain_weights: bad entry {entry!r}; expected distinct 'domain=weight' "
                             "with weight > 0")
        weights[domain] = weight
    return weights


def integer_proportions(weights: Sequence[float], max_denominator: int = 10_000) -> tuple[int, ...]:
    """Weights as the smallest integers in the same ratio (each weight as a fraction first): 0.5, 0.3, 0.2 ->
    5, 3, 2."""
    fracs = [fractions.Fraction(w).limit_denominator(max_denominator) for w in weights]
    scale = functools.reduce(math.lcm, (f.denominator for f in fracs))
    ints = [int(f * scale) for f in fracs]
    divisor = functools.reduce(math.gcd, ints)
    return tuple(i // divisor for i in ints)


def interleave(position: int, proportions: Sequence[int]) -> tuple[int, int]:
    """(domain, draw number within that domain) of `position` in the endless mixed sequence.

    With total R, domain 0 owns ceil(k·p0/R) of the first k positions, so position k is its when that count
    steps up at k + 1; the positions it does not own form, in order, the sequence of the remaining domains with
    total R − p0, where position k has rank floor(k·(R − p0)/R). Every domain d therefore owns exactly m·p_d of
    the first m·R positions (and fewer than D, the number of domains, away from k·p_d/R in between), and its draws
    are numbered 0, 1, 2, ... in position order. (grain's MapDataset.mix deals positions by the same rule.)
    """
    remaining, k = sum(proportions), position
    for d, p in enumerate(proportions):
        owned_before, owned_through = -(-k * p // remaining), -(-(k + 1) * p // remaining)
        if owned_through > owned_before:
            return d, owned_before
        k, remaining = k * (remaining - p) // remaining, remaining - p
    raise AssertionError("unreachable: the last domain owns every remaining position")


class Mixture(Sequence):
    """Records of several sources as one flat sequence (iteration, `len`, indexing) that the data cursor samples
    through `global_indices`: per step, positions dealt to domains by `weights`, uniform within a domain."""

    def __init__(self, parts: Sequence[Sequence[QARecord]], weights: Mapping[str, float], names: Sequence[str] = ()):
        self.parts, self.weights = list(parts), dict(weights)
        self.names = list(names) or [f"part {i}" for i in range(len(self.parts))]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        members: dict[str, list[int]] = {}
        first_part: dict[str, str] = {}
        for name, offset, part in zip(self.names, self.offsets, self.parts):
            for i, record in enumerate(part):
                domain = record.domain or DEFAULT_DOMAIN
                members.setdefault(domain, []).append(int(offset) + i)
                first_part.setdefault(domain, name)
        unweighted = sorted(set(members) - set(weights))
        if unweighted:
            raise ValueError(f"config.data.domain_weights has no weight for domain(s) {unweighted} (records from "
                             f"{', '.join(first_part[d] for d in unweighted)}); weights given: {dict(weights)}")
        empty = sorted(set(weights) - set(members))
        if empty:
            raise ValueError(f"config.data.domain_weights names domain(s) {empty} that no record of "
                             f"{', '.join(self.names)} has (domains present: {sorted(members)})")
        self.domains = list(weights)  # the config's order fixes the interleave
        self.members = [np.asarray(members[d]) for d in self.domains]
        self.proportions = integer_proportions([weights[d] for d in self.domains])
        self._orders: dict[tuple, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> QARecord:
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range ({len(self)} records)")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]

    def global_indices(self, per_step: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
        """Flat record indices of step `step` (all processes), a pure function of (seed, step)."""
        out = []
        for position in range(step * per_step, (step + 1) * per_step):
            d, draw = interleave(position, self.proportions)
            epoch, offset = divmod(draw, len(self.members[d]))
            out.append(int(self.members[d][self._order(seed, d, epoch, shuffle)[offset]]))
        return out

    def _order(self, seed: int, d: int, epoch: int, shuffle: bool) -> np.ndarray:
        """Domain d's record order in its epoch `epoch` (the last few are kept: a step rarely spans two epochs)."""
        key = (seed, d, epoch, shuffle)
        if key not in self._orders:
            n = len(self.members[d])
            if len(self._orders) >= 64:
                self._orders.clear()
            self._orders[key] = np.random.default_rng([seed, d, epoch]).permutation(n) if shuffle else np.arange(n)
        return self._orders[key]

    def subset(self, keep: Callable[[int, QARecord], bool]) -> "Mixture":
        """The mixture of the records of each part for which keep(index in its part, record) holds."""
        return Mixture([[r for i, r in enumerate(part) if keep(i, r)] for part in self.parts], self.weights,
                       self.names)

    def domain_counts(self) -> dict[str, int]:
        return {d: len(m) for d, m in zip(self.domains, self.members)}


def parse_component(entry: str) -> tuple[str, str, str | None]:
    """A mixture entry: a JSONL path ("...jsonl") -> ("jsonl", path, None); a TFDS name with an optional split in
    brackets ("exprl_qa/minerva_math[test]") -> ("tfds", name, split or None)."""
    entry = entry.strip()
    if entry.endswith(".jsonl"):
        return "jsonl", entry, None
    match = _COMPONENT.match(entry)
    if not match or "/" not in match.group("name") or os.sep in match.group("name").split("/", 1)[1]:
        raise ValueError(f"config.data mixture entry {entry!r}: expected a .jsonl path or a TFDS name like "
                         "'exprl_qa/gsm8k' or 'exprl_qa/minerva_math[test]'")
    return "tfds", match.group("name"), match.group("split")
