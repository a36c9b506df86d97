"""What a run is assembled from, before its first step: the model (preset or checkpoint), its tokenizer, the
records, and small run-level utilities (parameter digest, asset paths, the XLA compilation cache)."""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import jax
import numpy as np

from exprl_jax import config as config_lib
from exprl_jax import distributed, storage
from exprl_jax.data import QARecord, load_gsm8k, load_math, read_jsonl
from exprl_jax.models.config import ModelConfig
from exprl_jax.tokenizer import load_tokenizer, pad_id


def params_sha256(params) -> str:
    """Digest of every parameter's path, dtype, shape and bytes (host copy; with several processes every one
    must call it, since shards on other processes are gathered)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda x: jax.tree_util.keystr(x[0])):
        arr = distributed.to_host(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
    """A relative path that does not exist from the working directory is taken relative to the repository root,
    so shipped assets (e.g. assets/testbed_base) are found from anywhere. URLs (gs://...) are kept as given."""
    if not path or not storage.is_local(path) or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


PRESETS = {"tiny": ModelConfig.tiny, "qwen3_0_6b": ModelConfig.qwen3_0_6b, "qwen3_1_7b": ModelConfig.qwen3_1_7b,
           "qwen3_4b": ModelConfig.qwen3_4b, "qwen3_8b": ModelConfig.qwen3_8b}


def model_source(cfg: config_lib.ExperimentConfig) -> str:
    """The HF directory a run starts from ("" = a preset): init_checkpoint's final_hf, else hf_path."""
    m = cfg.model
    if m.init_checkpoint:
        return os.fspath(storage.as_path(resolve_path(m.init_checkpoint)) / "final_hf")
    return resolve_path(m.hf_path)


def model_config(cfg: config_lib.ExperimentConfig, tokenizer=None) -> ModelConfig:
    """The ModelConfig a run uses, without any weights: from the checkpoint's config.json, or the preset (with the
    tokenizer's special ids when given). The model section's dtypes and memory layout apply either way."""
    m = cfg.model
    fields = {k: getattr(m, k) for k in ("param_dtype", "dtype", "attention_impl", "scan_layers", "remat",
                                         "logits_chunk")}
    source = model_source(cfg)
    if source:
        return ModelConfig.from_hf_config(storage.read_json(storage.as_path(source) / "config.json"), **fields)
    if m.preset not in PRESETS:
        raise ValueError(f"config.model.preset={m.preset!r}; expected one of {tuple(PRESETS)}")
    fields.update({k: getattr(m, k) for k in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                              "mlp_dim") if getattr(m, k) > 0})
    if tokenizer is not None:
        fields.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer),
                      bos_token_id=tokenizer.bos_token_id)
    return PRESETS[m.preset](**fields)


def build_model(cfg: config_lib.ExperimentConfig, mesh=None):
    """(model config, loaded params or None, tokenizer). Precedence: init_checkpoint > hf_path (loaded tensor by
    tensor onto `mesh`) > a preset, whose params `init_train_state` then initialises directly on the mesh.
    Masters and optimizer state take model.param_dtype, whatever dtype the checkpoint was saved in."""
    source = model_source(cfg)
    if source:
        from exprl_jax.models.hf import load_hf

        config = model_config(cfg)
        overrides = {k: getattr(config, k) for k in ("param_dtype", "dtype", "attention_impl", "scan_layers",
                                                     "remat", "logits_chunk")}
        model_cfg, params = load_hf(source, mesh=mesh, **overrides)
        if not (storage.as_path(source) / "tokenizer.json").exists():
            return model_cfg, params, load_tokenizer(cfg.model.tokenizer)
        from exprl_jax.models.hf import TOKENIZER_FILES

        with storage.local_dir(source, names=TOKENIZER_FILES) as local:  # read whole: a download may then go
            return model_cfg, params, load_tokenizer(local)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model_cfg = model_config(cfg, tokenizer)
    if model_cfg.vocab_size < len(tokenizer):
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} < tokenizer size {len(tokenizer)}")
    return model_cfg, None, tokenizer  # None: init_train_state creates the params already sharded


def load_records(cfg: config_lib.ExperimentConfig) -> tuple[Sequence[QARecord], list[QARecord], dict]:
    """(train records, eval records, data stats) of a config. TFDS training records are read lazily, so the data
    cursor (`data.records_at`, per process) reads only the rows it picks; `data.filter_path` keeps the records a
    filter_hard.py result kept."""
    d = cfg.data
    stats: dict = {}
    if d.source == "toy_addition":
        from exprl_jax.tasks.toy import addition_records

        train, evals = addition_records(d.num_train or 256, seed=cfg.seed), addition_records(d.num_eval, seed=10_000)
    elif d.source in ("jsonl", "gsm8k", "math"):
        if not d.train_path:
            raise ValueError(f"config.data.train_path is required for data.source={d.source!r}")
        train, stats = _load_file(d, d.train_path)
        evals = _load_file(d, d.eval_path)[0] if d.eval_path else []
    elif d.source == "testbed":
        from exprl_jax.tasks.testbed import testbed_records

        train, evals = testbed_records(cfg)
    elif d.source == "tfds":
        if not d.tfds_name:
            raise ValueError("config.data.tfds_name is required for data.source='tfds' (e.g. 'exprl_qa/gsm8k')")
        train = _open_tfds(d, d.tfds_name, d.tfds_train_split)
        evals = (_load_file(d, d.eval_path)[0] if d.eval_path else
                 _open_tfds(d, d.tfds_name, d.tfds_eval_split)[:d.num_eval] if d.tfds_eval_split else [])
    elif d.source == "mixture":
        from exprl_jax.data.mixture import Mixture, parse_weights

        if not d.mixture or not d.domain_weights:
            raise ValueError("data.source='mixture' needs config.data.mixture and config.data.domain_weights")
        train = Mixture([_component(d, entry, d.tfds_train_split) for entry in d.mixture],
                        parse_weights(d.domain_weights), names=d.mixture)
        stats.update({f"data/domain_records/{k}": v for k, v in train.domain_counts().items()})
        evals = _load_file(d, d.eval_path)[0] if d.eval_path else [
            r for entry in d.eval_mixture for r in _component(d, entry, d.tfds_eval_split)[:d.num_eval]]
    else:
        raise ValueError(f"config.data.source={d.source!r} is not known")
    if d.filter_path:
        from exprl_jax.data.hard_filter import apply_filter

        num_before = len(train)
        train = apply_filter(train, resolve_path(d.filter_path))
        stats.update({"data/filter_pool": num_before, "data/filter_kept": len(train)})
    if d.num_train:
        train = train.subset(lambda i, _: i < d.num_train) if hasattr(train, "subset") else train[:d.num_train]
    return train, list(evals[:d.num_eval]), stats


def _load_file(d, path: str):
    if d.source == "gsm8k":
        return load_gsm8k(path), {}
    if d.source == "math":
        from exprl_jax.rewards.answers import extract_answer

        return load_math(path, extract_answer=extract_answer), {}
    return read_jsonl(path, on_bad_row=d.on_bad_row)


def _open_tfds(d, name: str, split: str):
    from exprl_jax.data.tfds_reader import open_tfds

    return open_tfds(name, split, resolve_path(d.tfds_data_dir), shared_data=d.shared_data or None)


def _component(d, entry: str, default_split: str):
    """One mixture entry's records: a JSONL file or a TFDS split."""
    from exprl_jax.data.mixture import parse_component

    kind, name, split = parse_component(entry)
    if kind == "jsonl":
        return read_jsonl(resolve_path(name), on_bad_row=d.on_bad_row)[0]
    return _open_tfds(d, name, split or default_split)


def keep_freed_host_memory() -> bool:
    """Has glibc keep freed host memory for reuse instead of returning it to the OS. Call it before the first
    device use (threads that already allocated keep their own malloc arenas). Linux with glibc only; set
    EXPRL_JAX_HOST_ALLOCATOR=default to skip it. Returns whether it applied.

    XLA:CPU allocates an executable's temporaries afresh at every call (one 823 MB buffer per step of the CPU
    benchmark's train step). glibc serves an allocation that large from its own mmap, or from a per-thread arena
    that cannot hold it, and unmaps it when freed, so every step page-faulted and zeroed all of it again: 18% of
    the step's CPU samples were in the kernel. One arena (the main heap), no mmap'ed chunks and no trimming below
    2 GiB keep the pages mapped: the train step ran 1.2-1.3x faster on one core. The cost: the process keeps its
    peak heap until it exits, and its threads share one malloc arena."""
    if os.environ.get("EXPRL_JAX_HOST_ALLOCATOR", "") == "default":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
    return all(mallopt(option, value) == 1 for option, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persistent XLA compilation cache (halves a small run's wall time on CPU; a restart compiles nothing).
    Default: $EXPRL_JAX_CACHE or ~/.cache/exprl_jax/xla."""
    directory = directory or os.environ.get("EXPRL_JAX_CACHE") or os.path.expanduser("~/.cache/exprl_jax/xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
