"""Hugging Face checkpoint I/O: read and write `config.json` + safetensors (one file or an indexed set of shards)
for Qwen3 / Qwen2 / Llama, without torch or network, converting between HF's [out, in] matrices and our layout.
Directories may be local or on an object store (gs://...). In a multi-process run every process calls both:
`load_hf` places only its own shards, `save_hf` gathers each tensor and process 0 writes.
Also loads a tokenizer (with its chat template) from a local directory."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes, save_file

from exprl_jax import distributed, storage
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.transformer import init_boxed, unstack_layers
from exprl_jax.sharding import param_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# RoPE frequencies that older transformers versions saved as buffers; we recompute them from rope_theta.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and where it lives in our params. Ours = (hf.T if transpose else hf).reshape(our_shape)."""
    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]
    transpose: bool

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return (hf.T if self.transpose else hf).reshape(self.our_shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(ours.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(ours.reshape(self.hf_shape))


def _abstract_boxed(config: ModelConfig):
    """Shapes and logical axes of our params, without allocating them."""
    return jax.eval_shape(lambda: init_boxed(config, jax.random.key(0)))


def _placements(config: ModelConfig, table: list[_Tensor]):
    """(our params path, the HF tensors that fill it): one each, or with scan_layers one per layer for each
    stacked "layers" leaf (in layer order)."""
    if not config.scan_layers:
        return [(e.path, [e]) for e in table]
    groups: dict[tuple[str, ...], list[_Tensor]] = {}
    for e in table:
        key = ("layers", *e.path[1:]) if e.path[0].startswith("layers_") else e.path
        groups.setdefault(key, []).append(e)  # the table lists layers in order
    return list(groups.items())


def _tensor_table(config: ModelConfig, abstract_boxed=None) -> list[_Tensor]:
    """Every HF tensor of `config`, checked against the params tree the model itself declares (in the unrolled
    layout; `_placements` maps it onto scan_layers' stacked one)."""
    config = config.replace(scan_layers=False)
    D, N, K, H, F, V = (config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim,
                        config.vocab_size)
    table = [("model.embed_tokens.weight", ("embed",), (V, D), False),
             ("model.norm.weight", ("final_norm", "scale"), (D,), False)]
    if not config.tie_embeddings:
        table.append(("lm_head.weight", ("lm_head",), (V, D), True))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        table += [(hf + "input_layernorm.weight", (ours, "input_norm", "scale"), (D,), False),
                  (hf + "post_attention_layernorm.weight", (ours, "post_attn_norm", "scale"), (D,), False),
                  (hf + "self_attn.q_proj.weight", (ours, "attn", "q_proj"), (N * H, D), True),
                  (hf + "self_attn.k_proj.weight", (ours, "attn", "k_proj"), (K * H, D), True),
                  (hf + "self_attn.v_proj.weight", (ours, "attn", "v_proj"), (K * H, D), True),
                  (hf + "self_attn.o_proj.weight", (ours, "attn", "o_proj"), (D, N * H), True),
                  (hf + "mlp.gate_proj.weight", (ours, "mlp", "gate_proj"), (F, D), True),
                  (hf + "mlp.up_proj.weight", (ours, "mlp", "up_proj"), (F, D), True),
                  (hf + "mlp.down_proj.weight", (ours, "mlp", "down_proj"), (D, F), True)]
        if config.qkv_bias:
            table += [(hf + f"self_attn.{x}_proj.bias", (ours, "attn", f"{x}_bias"), (n * H,), False)
                      for x, n in (("q", N), ("k", K), ("v", K))]
        if config.o_bias:
            table.append((hf + "self_attn.o_proj.bias", (ours, "attn", "o_bias"), (D,), False))
        if config.qk_norm:
            table += [(hf + f"self_attn.{x}_norm.weight", (ours, "attn", f"{x}_norm", "scale"), (H,), False)
                      for x in ("q", "k")]

    declared = {tuple(k.key for k in path): leaf.shape for path, leaf in
                jax.tree_util.tree_leaves_with_path(nn.unbox(
                    _abstract_boxed(config) if abstract_boxed is None else abstract_boxed))}
    entries = [_Tensor(name, path, shape, declared.get(path, ()), transpose) for name, path, shape, transpose in table]
    if set(declared) != {e.path for e in entries}:  # the model grew or lost a parameter that this file must map
        raise RuntimeError(f"HF tensor table out of sync with the model: params {sorted(declared)} vs table "
                           f"{sorted(e.path for e in entries)}")
    return entries


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _tensor_files(path: str) -> tuple[dict[str, str], str]:
    """Maps each stored tensor name to its safetensors file; also returns what to name in a 'missing' error."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):  # preferred when both exist, as transformers does
        with safe_open(single, framework="np") as f:
            return {name: SINGLE_FILE for name in f.keys()}, single
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                                f"checkpoints are supported); files: {sorted(os.listdir(path))}")
    with open(index) as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
    missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(path, s))})
    if missing:
        raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
    return weight_map, index


def _read_dtype(hf_config: dict[str, Any]) -> str:
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return declared if declared in ("float32", "bfloat16", "float16") else "float32"


def load_hf(path, *, mesh: jax.sharding.Mesh | None = None, **overrides) -> tuple[ModelConfig, dict]:
    """Reads a HF model directory (local, or gs://... through a temporary download) into (config, params).

    Any `ModelConfig` field can be overridden by keyword (`load_hf(path, attention_impl="chunked",
    scan_layers=True, logits_chunk=512, param_dtype="float32")`); the params come in the layout that config needs
    (stacked layers with `scan_layers`). `param_dtype` defaults to the dtype config.json declares (`dtype` /
    `torch_dtype`, else float32) and `dtype` (compute) to `param_dtype`; tensors are cast on the host, so a bf16
    checkpoint loaded with param_dtype="float32" gives float32 masters. Tensors are read one at a time
    (memory-mapped; with scan_layers, one parameter kind across all layers) and each goes straight to its device,
    or with a mesh to its `param_shardings` sharding, so the model is never whole in host memory nor on one device;
    with several processes each copies only the shards its own devices hold (`jax.make_array_from_callback`).
    In a tied model a stored `lm_head.weight` is accepted only when equal to the embedding (some exporters write
    both); a different one raises, since dropping it would silently change the model.
    """
    with storage.local_dir(path) as local:
        return _load_local(local, mesh, overrides)


def _load_local(path: str, mesh, overrides: dict) -> tuple[ModelConfig, dict]:
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise TypeError(f"load_hf: {unknown} are not ModelConfig fields; any of "
                        f"{[f.name for f in dataclasses.fields(ModelConfig)]} can be overridden")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.setdefault("param_dtype", _read_dtype(hf_config))
    overrides.setdefault("dtype", overrides["param_dtype"])
    config = ModelConfig.from_hf_config(hf_config, **overrides)
    table = _tensor_table(config)
    files, listing = _tensor_files(path)

    expected = {e.hf_name for e in table}
    tied_head = config.tie_embeddings and "lm_head.weight" in files
    extra = sorted(n for n in files if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                   and not (tied_head and n == "lm_head.weight"))
    if extra:
        raise ValueError(f"{path}: unexpected tensors for {config.family} {hf_config.get('architectures')}: {extra}")

    shardings = param_shardings(_abstract_boxed(config), mesh) if mesh is not None else None
    host_dtype = np.dtype(config.jnp_param_dtype)
    params: dict = {}
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in files:
                raise ValueError(f"{path}: tensor {name!r} is missing from {listing}")
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(os.path.join(path, file), framework="np"))
            if name not in handles[file].keys():
                raise ValueError(f"{path}: tensor {name!r} is missing from {file} (where {listing} places it)")
            stored = tuple(handles[file].get_slice(name).get_shape())
            if stored != shape:
                raise ValueError(f"{path}: tensor {name!r} has shape {stored}, expected {shape} from config.json")
            return handles[file].get_tensor(name)

        for our_path, entries in _placements(config, table):
            hosts = [e.to_ours(read(e.hf_name, e.hf_shape)).astype(host_dtype) for e in entries]
            host = np.stack(hosts) if config.scan_layers and our_path[0] == "layers" else hosts[0]
            target = _get(shardings, our_path) if shardings is not None else None
            _set(params, our_path, jax.device_put(host) if target is None else distributed.global_array(host, target))
            del hosts, host
        if tied_head:
            embed = read("model.embed_tokens.weight", (config.vocab_size, config.d_model))
            if not np.array_equal(read("lm_head.weight", embed.shape), embed):
                raise ValueError(f"{path}: tie_word_embeddings=true but lm_head.weight differs from "
                                 "model.embed_tokens.weight; set tie_word_embeddings=false to keep both")
    return config, params


def _shard_plan(sizes: list[int], max_shard_bytes: int | None) -> list[list[int]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow; a lone oversized tensor is kept."""
    shards: list[list[int]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if max_shard_bytes is not None and shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(i)
        filled += size
    return shards


def _to_host(leaf, dtype: np.dtype) -> np.ndarray:
    """The whole tensor on this host; shards on other processes are gathered (a collective)."""
    return distributed.to_host(leaf).astype(dtype, copy=False)


def save_hf(path, config: ModelConfig, params, *, max_shard_bytes: int | None = None,
            tokenizer_dir: str | None = None) -> None:
    """Writes `params` as a HF checkpoint that `AutoModelForCausalLM.from_pretrained` and vLLM load.

    Tensors are stored in `config.param_dtype`; over `max_shard_bytes` they are split into
    `model-0000i-of-0000n.safetensors` plus an index. Old model*.safetensors / index files in `path` are removed
    first, so a stale single file cannot shadow new shards. Only one shard is on the host at a time. With several
    processes, every process must call it (each tensor is gathered in turn); process 0 writes.
    """
    hf_config = config.to_hf_config()  # first, so a config HF cannot express fails before any file is touched
    table = _tensor_table(config)
    if config.scan_layers:
        if "layers" not in params:
            raise ValueError("save_hf: config.scan_layers=True but params have no stacked 'layers' subtree")
        params = unstack_layers(params, config.num_layers)
    for entry in table:
        leaf = _get(params, entry.path)
        if tuple(leaf.shape) != entry.our_shape:
            raise ValueError(f"params[{'/'.join(entry.path)}] has shape {tuple(leaf.shape)}, "
                             f"expected {entry.our_shape} from the config")
    path, writer = storage.as_path(path), distributed.is_primary()
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        for old in path.iterdir():
            if old.name == INDEX_FILE or (old.name.startswith("model") and old.name.endswith(".safetensors")):
                old.unlink()

    dtype = np.dtype(config.jnp_param_dtype)
    sizes = [math.prod(e.hf_shape) * dtype.itemsize for e in table]
    plan = _shard_plan(sizes, max_shard_bytes)
    weight_map = {}
    for n, members in enumerate(plan, start=1):
        file = SINGLE_FILE if len(plan) == 1 else f"model-{n:05d}-of-{len(plan):05d}.safetensors"
        hosts = {i: _to_host(_get(params, table[i].path), dtype) for i in members}  # every process: collectives
        if writer:
            tensors = {table[i].hf_name: table[i].to_hf(hosts[i]) for i in members}
            _write_safetensors(tensors, path / file)
            weight_map.update({name: file for name in tensors})
        del hosts
    if writer:
        if len(plan) > 1:
            storage.write_json(path / INDEX_FILE, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                               indent=2)
        storage.write_json(path / "config.json", hf_config, indent=2)
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if hf_config[k] is not None}
        storage.write_json(path / "generation_config.json", generation, indent=2)
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, path)
    distributed.barrier("save_hf")  # on return the checkpoint is complete, for every process


def _write_safetensors(tensors: dict[str, np.ndarray], path) -> None:
    metadata = {"format": "pt"}  # transformers requires "format"
    if storage.is_local(path):
        save_file(tensors, os.fspath(path), metadata=metadata)
    else:
        path.write_bytes(safetensors_bytes(tensors, metadata=metadata))


def _check_tokenizer_dir(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        found = sorted(os.listdir(path)) if os.path.isdir(path) else "directory does not exist"
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer is required); found: {found}")


def _copy_tokenizer(source: str, dest) -> None:
    _check_tokenizer_dir(source)
    if storage.is_local(dest) and os.path.realpath(source) == os.path.realpath(dest):
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            storage.as_path(dest / name).write_bytes(storage.as_path(os.path.join(source, name)).read_bytes())


def load_tokenizer(path):
    """A `transformers.PreTrainedTokenizerFast` from tokenizer.json (+ tokenizer_config.json, chat template) in
    `path`, offline. transformers itself raises if the chat template needs jinja2 and it is missing."""
    from transformers import AutoTokenizer  # imported here: loading a model needs neither transformers nor torch

    with storage.local_dir(path) as local:  # read whole into memory, so a temporary download may go
        _check_tokenizer_dir(local)
        return AutoTokenizer.from_pretrained(local, local_files_only=True)
