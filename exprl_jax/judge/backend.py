"""The one interface every judge backend implements: chat messages in, one completion (or a reason) out.

Backends: `openai` (async HTTP client), `local` (in-process sampler), `programmatic` (checkpoint lists). A
failed call returns `Completion(text=None, reason=...)`; the caller marks the item unscored, never score 0.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str | None  # the judge's answer; None when the call failed
    reason: str | None = None  # why text is None, e.g. "timeout", "http_503", "empty_choices"
    prompt_tokens: int = 0  # from the server's `usage`, 0 when absent
    completion_tokens: int = 0
    latency_s: float = 0.0  # wall time of the whole call, retries included
    retries: int = 0  # attempts beyond the first


class ChatBackend(Protocol):
    """`model` names the judge (part of cache keys); `decoding` holds the decoding parameters (ditto)."""

    model: str
    decoding: dict

    async def complete(self, messages: Sequence[dict]) -> Completion: ...

    async def aclose(self) -> None: ...
