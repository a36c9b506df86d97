"""Typed experiment config: ml_collections `ConfigDict` files are converted once into frozen dataclasses.

Conversion is strict: an unknown key, a missing section or a value of the wrong type is an error naming the
dotted key. Every field has a comment; defaults follow SPEC §5 where the paper fixes a value.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

from exprl_jax.advantages import VARIANTS
from exprl_jax.train_state import OptimConfig

METHODS = ("sft", "grpo", "exprl_outcome", "exprl_process", "self_distill", "stage2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    preset: str = "tiny"  # a ModelConfig preset name, used when hf_path is empty
    hf_path: str = ""  # a local Hugging Face model directory (config.json + safetensors + tokenizer)
    init_checkpoint: str = ""  # a workdir of an earlier run (e.g. Stage I) whose final params start this one
    tokenizer: str = "char"  # "char" (built-in character vocabulary) or a directory with tokenizer.json
    dtype: str = "float32"  # compute dtype ("bfloat16" on TPU/GPU)
    param_dtype: str = "float32"  # master weights and optimizer state, whatever dtype a checkpoint was saved in
    attention_impl: str = "auto"  # ModelConfig.attention_impl: "auto", "xla", "chunked", "splash", "cudnn"
    scan_layers: bool = False  # ModelConfig.scan_layers: stacked layer params, one scan over layers
    remat: str = "none"  # ModelConfig.remat: "none", "full", "dots", "dots_no_batch", "proj"
    logits_chunk: int = 0  # ModelConfig.logits_chunk: positions per chunk of the vocabulary projection (0 = off)
    d_model: int = 0  # > 0 overrides the preset (quick size sweeps); likewise below
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    mlp_dim: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    shape: tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor); one entry may be -1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    source: str = "toy_addition"  # "toy_addition", "jsonl", "gsm8k", "math", "testbed", "tfds", "mixture"
    train_path: str = ""  # for jsonl / gsm8k / math
    eval_path: str = ""  # also for tfds / mixture: a JSONL eval set instead of the TFDS one
    tfds_name: str = ""  # source "tfds": e.g. "exprl_qa/gsm8k" (python -m exprl_jax.data.build_tfds)
    tfds_data_dir: str = ""  # TFDS data folder ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets); an exprl_qa config
    #                          not built there yet is built from the shared data folder first (nothing downloaded)
    tfds_train_split: str = "train"  # TFDS split syntax, slicing allowed ("test[:2000]")
    tfds_eval_split: str = "test"  # "" = no eval set
    shared_data: str = ""  # the shared data folder for building exprl_qa ("" = $EXPRL_SHARED_DATA or ../shared/data)
    mixture: tuple[str, ...] = ()  # source "mixture": TFDS names ("exprl_qa/minerva_math[test]"; default split
    #                                tfds_train_split) and/or JSONL paths, pooled and drawn by domain_weights
    eval_mixture: tuple[str, ...] = ()  # the mixture's eval sets, same syntax; num_eval records of each
    domain_weights: tuple[str, ...] = ()  # "domain=weight" per domain of the mixture, e.g. ("math=0.6", "science=0.4")
    filter_path: str = ""  # a filter_hard.py result (JSON): train only on the records it kept
    num_train: int = 0  # > 0: keep only the first n training records
    num_eval: int = 64
    on_bad_row: str = "error"  # or "skip" (skipped rows are counted in metrics)
    prompt_template: str = "{problem}\n"  # only {problem}: the reference never reaches the policy
    chat_template: bool = False  # wrap the prompt as a user turn of the tokenizer's chat template
    answer_style: str = "boxed"  # how the final answer is extracted: "boxed", "gsm8k", "auto"
    shuffle: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSection:
    prompts_per_step: int = 8  # B
    group_size: int = 4  # G: samples per prompt (N = B·G rollouts per step)
    max_new_tokens: int = 32
    max_prompt_tokens: int = 0  # > 0: a longer policy prompt is an error naming the record; `plan` budgets for it
    temperature: float = 0.8  # SPEC §5
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False  # sample exactly max_new_tokens (benchmarks): EOS does not end a rollout, every row is
    #                           then "truncated" (SPEC §4 Overlong: reward 0 without a judge call)
    recompute_logprobs: str = "auto"  # "true" / "false" / "auto" (= on unless model.dtype and rollout.dtype are
    #                                   float32): behaviour log-probs from the training forward, so the first
    #                                   update's ratio is exactly 1
    dtype: str = "auto"  # weights and compute of the rollout engine's copy of the policy; "auto" = model.dtype
    max_concurrent_rows: int = 0  # cache slots of the rollout engine (0 = every row of a call at once); finished
    #                               rows' slots are refilled, so any number of rows samples through bounded memory


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSection:
    clip_low: float = 0.2  # SPEC §5 asymmetric clip
    clip_high: float = -1.0  # -1: the method's value, 0.28 Outcome / 0.26 Process, GRPO, Stage II
    dual_clip: float = 3.0  # <= 0 turns dual-clip off
    agg: str = "token-mean"
    kl_coef: float = -1.0  # KL to the initial policy as a loss term; -1: 0.001 for RL methods, 0 for Stage II,
    #                        SFT and self-distillation (0 also skips the reference forward pass)
    kl_kind: str = "k3"
    entropy_coef: float = -1.0  # entropy bonus; -1: 1e-4 for Stage II, else 0
    ppo_mini_batch_size: int = 0  # rollouts per update; 0 = the whole step batch (fully on-policy)
    scale_by_std: str = "auto"  # GRPO std normalisation: "true", "false" (Stage II / Dr.GRPO) or "auto"
    grpo_variant: str = "paper"  # "authors": the authors' code's GRPO (unscored rows count as reward 0 in the
    #                              group statistics; a group of one gets r / (1 + 1e-6)); WORKSPACE.md table

    def __post_init__(self):
        if self.grpo_variant not in VARIANTS:
            raise ValueError(f"config.loss.grpo_variant={self.grpo_variant!r}; expected one of {VARIANTS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessSection:
    mode: str = "delta"  # DeltaNorm / "end" / "group" (SPEC §4)
    single_segment: str = "zero"  # T = 1 under DeltaNorm: "zero" (formula) or "score" (authors' code)
    context: str = "segment"  # judge sees the step alone ("segment") or the prefix up to it ("prefix")
    delimiter: str = "###"
    variant: str = "paper"  # "authors": the authors' code's segment boundaries, EndNorm and GroupNorm, and the
    #                         judge also scores Overlong rollouts (SPEC §4; WORKSPACE.md "Paper vs the authors' code")

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"config.process.variant={self.variant!r}; expected one of {VARIANTS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JudgeSection:
    backend: str = "programmatic"  # "openai", "local", "programmatic"; "exact_step": the exact per-step reward
    #                                (a positive control for exprl_process, exprl_jax/rewards/exact_step.py)
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""  # name of the environment variable holding the key (never the key itself)
    max_concurrency: int = 64
    requests_per_minute: int = 0  # 0 = unlimited
    tokens_per_minute: int = 0
    timeout_s: float = 120.0
    max_retries: int = 4
    max_tokens: int = 2048  # SPEC §3: greedy, up to 2048 output tokens
    overlap: bool = False  # judge step t while sampling step t+1 (one step off-policy)
    cache: bool = True  # content-addressed answer cache under <workdir>/judge_cache
    use_reference: bool = True
    reference: str = "own"  # "other": judge against another training problem's reference (a drift control)
    noise: float = 0.0  # programmatic: share of verdicts replaced by a uniform 1..5 draw (misplacement ~ noise/2)
    rubric_path: str = ""  # JSON of per-problem checkpoints built once (optional)
    domain_templates: tuple[str, ...] = ()  # "domain=template set" added to judge.reward.DOMAIN_TEMPLATE_SETS
    #                                         (math / testbed -> math, science -> science, code -> code); a record's
    #                                         domain picks its judge template, and a domain without one is an error
    max_unscored_steps: int = 5  # stop after this many consecutive steps with nothing scored (0 = never)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TestbedSection:
    """The CPU testbed task family (exprl_jax/tasks/testbed.py), used when data.source == "testbed"."""

    view: str = "stage1"  # "pretrain" (native traces of easy items) or "stage1" (hard items with references)
    pretrain_steps: tuple[int, ...] = (1, 2, 3, 4)  # difficulty (number of dependent steps) of pre-training items
    long_steps: tuple[int, ...] = (5, 6)  # a small share of longer pre-training items, for length generalisation
    long_frac: float = 0.1
    reference_prompt_frac: float = 0.1  # pre-training items whose prompt contains a reference (teacher skill)
    reference_prompt_steps: tuple[int, ...] = ()  # their difficulty; () = pretrain_steps + long_steps
    num_pretrain: int = 65536  # pre-training items generated (the SFT loop cycles through them)
    stage1_steps: tuple[int, ...] = (7, 8)  # Stage-I set and same-difficulty eval set (default.py: the pool rule's k)
    harder_steps: tuple[int, ...] = (9,)  # the held-out harder eval set (beyond every pre-training chain)
    num_pool: int = 2048  # hard candidates generated before the base-model filter
    hard_filter_k: int = 16  # keep problems the base fails in all k samples (SPEC §2); 0 = no filter
    base_checkpoint: str = "assets/testbed_base"  # the shipped pre-trained base (relative to the repo root)
    filter_cache_dir: str = ""  # where the base-model filter's result is cached ("": next to base_checkpoint)
    ladder_steps: tuple[int, ...] = ()  # the evaluation ladder: chain lengths evaluated after each stage
    ladder_problems: int = 64  # held-out chains per rung


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    steps: int = 20
    log_every: int = 1
    save_every: int = 10
    keep_checkpoints: int = 2
    micro_batch_size: int = 0  # rows per micro-step of gradient accumulation inside one update (0 = the whole
    #                            mini-batch), rounded up to a multiple of data×fsdp; also the rows per call of the
    #                            reference / teacher / recompute log-prob passes
    batch_size: int = 16  # SFT sequences per step
    seq_len: int = 64  # SFT sequence length (tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    num_samples: int = 8  # n per problem for pass@k (SPEC §7: 128 in the paper)
    temperature: float = 0.8
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    at_start: bool = True
    at_end: bool = True
    final_num_samples: int = 0  # pipeline: n per problem on the hardest rung after Stage II (0: no extra pass)
    cache_dir: str = ""  # pipeline: the base model's evaluations, keyed by its weights' sha256 ("": <hf_path>/eval_cache)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage2Section:
    """SPEC §2 Stage II after this run's Stage I (run.py's pipeline): sparse GRPO from the Stage-I checkpoint."""

    steps: int = 0  # 0 = no Stage II
    learning_rate: float = -1.0  # -1: the Stage-I optim.learning_rate
    group_size: int = 0  # 0: the Stage-I rollout.group_size (SPEC §5: 32 in the paper)
    prompts_per_step: int = 0  # 0: the Stage-I rollout.prompts_per_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    method: str = "sft"  # one of METHODS
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    optim: OptimConfig = OptimConfig()
    data: DataSection = DataSection()
    rollout: RolloutSection = RolloutSection()
    loss: LossSection = LossSection()
    process: ProcessSection = ProcessSection()
    judge: JudgeSection = JudgeSection()
    testbed: TestbedSection = TestbedSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    stage2: Stage2Section = Stage2Section()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"config.method={self.method!r}; expected one of {METHODS}")


# SPEC §5 / §6 values that differ by method; "auto" (-1) fields in LossSection resolve to these.
METHOD_LOSS_DEFAULTS = {
    "exprl_outcome": dict(clip_high=0.28, kl_coef=0.001, entropy_coef=0.0, scale_by_std="true"),
    "exprl_process": dict(clip_high=0.26, kl_coef=0.001, entropy_coef=0.0, scale_by_std="true"),
    "grpo": dict(clip_high=0.26, kl_coef=0.001, entropy_coef=0.0, scale_by_std="true"),
    "stage2": dict(clip_high=0.26, kl_coef=0.0, entropy_coef=1e-4, scale_by_std="false"),
    "self_distill": dict(clip_high=0.28, kl_coef=0.0, entropy_coef=0.0, scale_by_std="true"),
    "sft": dict(clip_high=0.28, kl_coef=0.0, entropy_coef=0.0, scale_by_std="true"),
}


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """Replaces every "auto" loss field with the method's SPEC value; explicit values are kept (and checked)."""
    defaults = METHOD_LOSS_DEFAULTS[cfg.method]
    loss = cfg.loss
    is_auto = {k: (getattr(loss, k) == "auto") if k == "scale_by_std" else getattr(loss, k) < 0 for k in defaults}
    changes = {k: v for k, v in defaults.items() if is_auto[k]}
    loss = dataclasses.replace(loss, **changes)
    if loss.scale_by_std not in ("true", "false"):
        raise ValueError(f"config.loss.scale_by_std={loss.scale_by_std!r}; expected 'true', 'false' or 'auto'")
    if cfg.rollout.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"config.rollout.dtype={cfg.rollout.dtype!r}; expected 'auto', 'float32', 'bfloat16' or "
                         "'float16'")
    if cfg.rollout.recompute_logprobs not in ("auto", "true", "false"):
        raise ValueError(f"config.rollout.recompute_logprobs={cfg.rollout.recompute_logprobs!r}; expected 'true', "
                         "'false' or 'auto'")
    return dataclasses.replace(cfg, loss=loss)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"config.{key}: expected a tuple, got {type(value).__name__} {value!r}")
        item = typing.get_args(annotation)[0]
        return tuple(_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except TypeError:
                pass
        raise TypeError(f"config.{key}: {value!r} does not match {annotation}")
    if annotation is type(None):
        if value is not None:
            raise TypeError(f"config.{key}: expected None, got {value!r}")
        return value
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise TypeError(f"config.{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, values: Any, prefix: str = ""):
    """Builds dataclass `cls` from a (nested) mapping, rejecting unknown keys and wrong types by dotted name."""
    values = dict(values.items()) if hasattr(values, "items") else values
    if not isinstance(values, dict):
        raise TypeError(f"config.{prefix.rstrip('.')}: expected a section, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise KeyError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, annotation, prefix + name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (used to refuse a resume with another config)."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple))
                               and list(va) == list(vb)):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def default_config_dict():
    """An `ml_collections.ConfigDict` holding every field's default; config files start from it and override."""
    import ml_collections

    return ml_collections.ConfigDict(to_dict(ExperimentConfig()))


def config_from_file(path: str, *args):
    """The `ml_collections.ConfigDict` a config file's `get_config(*args)` returns (also for one config file built
    on another: `config_from_file(os.path.join(os.path.dirname(__file__), "qwen3_4b_exprl.py"))`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"exprl_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def load_config(path: str, **overrides) -> ExperimentConfig:
    """An ExperimentConfig from a config file's `get_config()`, with dotted-key overrides (`**{"train.steps": 2}`),
    checked like command-line overrides."""
    values = config_from_file(path).to_dict()
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for p in parents:
            if p not in node:
                raise KeyError(f"unknown config key: {dotted}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key: {dotted}")
        node[leaf] = value
    return from_dict(ExperimentConfig, values)
