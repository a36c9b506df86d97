"""The LLM judge of ExpRL (SPEC §3): prompt templates, answer parsing, Process segmentation and `JudgeReward`.

The HTTP client, the answer cache and the judge statistics are imported on first use, so this package imports
without them.
"""
from exprl_jax.judge.backend import ChatBackend, Completion
from exprl_jax.judge.parse import parse_checkpoints, parse_score, parse_score_with_reason, score_to_reward
from exprl_jax.judge.reward import JudgeReward, TEMPLATE_SETS, select_template
from exprl_jax.judge.segment import segment_batch, segment_response
from exprl_jax.judge.templates import Template, TemplateError, list_templates, load_template

_LAZY = {  # name → module, for modules that pull in heavier dependencies (httpx) or may be absent
    "OpenAIChatClient": "exprl_jax.judge.client",
    "JudgeClientConfig": "exprl_jax.judge.client",
    "JudgeCache": "exprl_jax.judge.cache",
    "JudgeStats": "exprl_jax.judge.stats",
}

__all__ = [
    "ChatBackend", "Completion", "JudgeReward", "TEMPLATE_SETS", "Template", "TemplateError", "list_templates",
    "load_template", "parse_checkpoints", "parse_score", "parse_score_with_reason", "score_to_reward",
    "segment_batch", "segment_response", "select_template", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
