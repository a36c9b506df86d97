"""The judge must fit the data, checked once at startup: every record's domain has a judge template for the run's
mode, and a programmatic judge only gets records it can verify (checkpoints and a boxed answer). A mismatch is an
error naming the judge and the data, never a run whose rewards are quietly the lowest score.
"""
from __future__ import annotations

import collections
from typing import Iterable

from exprl_jax.data import QARecord

MAX_EXAMPLES = 3


class JudgeDataMismatch(ValueError):
    """The configured judge cannot score the configured data."""


def programmatic_can_verify(record: QARecord) -> bool:
    """What ProgrammaticBackend needs: `name=value` checkpoints (carried by the record or written in its
    reference) and a \\boxed{} final answer in the reference."""
    from exprl_jax.judge.programmatic import checkpoints_of
    from exprl_jax.rewards.answers import extract_answer

    has_checkpoints = bool(record.checkpoints) or bool(checkpoints_of(record.reference))
    return has_checkpoints and extract_answer(record.reference, style="boxed") is not None


def check_judge_fits(judge, backend_name: str, records: Iterable[QARecord], data_name: str) -> dict[str, int]:
    """Raises JudgeDataMismatch naming the judge (`backend_name`, mode, template) and the data (`data_name`) when
    some record cannot be scored; returns the number of records per domain."""
    from exprl_jax.judge.reward import DEFAULT_DOMAIN

    judge_name = f"judge.backend={backend_name!r} ({judge.kind})"
    domains: collections.Counter[str] = collections.Counter()
    unverifiable: list[str] = []
    num_unverifiable = 0
    for record in records:
        domains[record.domain or DEFAULT_DOMAIN] += 1
        if backend_name == "programmatic" and not programmatic_can_verify(record):
            num_unverifiable += 1
            if len(unverifiable) < MAX_EXAMPLES:
                unverifiable.append(record.id)
    for domain, count in sorted(domains.items()):
        try:
            judge.template_for(domain)
        except ValueError as err:
            raise JudgeDataMismatch(f"{judge_name} cannot score {data_name}: {count} records of domain "
                                    f"{domain!r}: {err}") from None
    if num_unverifiable:
        total = sum(domains.values())
        raise JudgeDataMismatch(
            f"{judge_name} cannot score {data_name}: {num_unverifiable} of {total} records carry no checkpoints "
            f"(name=value results, on the record or in its reference) with a \\boxed{{}} answer (e.g. "
            f"{', '.join(unverifiable)}), so every rollout would get the lowest score. Use an LLM judge: "
            "judge.backend='openai' with judge.base_url / judge.model (python -m exprl_jax.serve serves any local "
            "model), or judge.backend='local'.")
    return dict(domains)
