"""python -m exprl_jax.plan --config=<file> --topology=v5p-32 [--config.a.b=v ...]

Will a config fit? Compiles every program one step of the config runs, at its real shapes and mesh, for a Cloud TPU
slice that is not attached (deviceless ahead-of-time compilation through libtpu, as MaxText's train_compile does),
and prints the compiler's own per-chip memory figures and FLOPs. Nothing runs. The programs come from the same
factories the run uses (train_state.make_train_step, rollouts._score, ...): there is no second copy of any program.
Exits 1 when a program does not fit; the last line says which.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Callable

# libtpu serves one process at a time unless told otherwise; the CPU stays the default backend
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GiB = 2**30
# Cloud TPU name -> (topology for get_topology_desc, HBM per chip in bytes as the compiler budgets it)
TOPOLOGIES = {
    "v5e-16": ("v5e:4x4", 16 * GiB), "v5e-64": ("v5e:8x8", 16 * GiB), "v5e-256": ("v5e:16x16", 16 * GiB),
    "v5p-8": ("v5p:2x2x1", 95 * GiB), "v5p-32": ("v5p:2x2x4", 95 * GiB), "v5p-64": ("v5p:2x4x4", 95 * GiB),
    "v5p-128": ("v5p:4x4x4", 95 * GiB),
    "v6e-8": ("v6e:2x4", 32 * GiB), "v6e-16": ("v6e:4x4", 32 * GiB), "v6e-64": ("v6e:8x8", 32 * GiB),
    "v4-32": ("v4:2x2x4", 16 * GiB),  # listed per TensorCore (2 per chip, 32 GiB per chip)
}


def topology_devices(name: str):
    """The devices of a Cloud TPU slice by its Cloud name (e.g. "v5p-32"), without a TPU attached."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {sorted(TOPOLOGIES)}")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name][0]).devices


@dataclasses.dataclass
class Program:
    """One compiled program's per-chip memory (bytes) and FLOPs, or why it did not compile. `resident`: arrays
    that are alive on the chips while it runs without being its arguments (e.g. the training state while sampling)."""
    name: str
    shapes: str
    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliased: int = 0
    resident: int = 0
    flops: float = 0.0
    error: str = ""

    @property
    def peak(self) -> int:  # donated arguments alias outputs and are counted once
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.resident


def compile_program(name: str, shapes: str, lower: Callable, resident: int = 0):
    """(Program, compiled executable or None). RESOURCE_EXHAUSTED (or any compile error) is recorded, not raised."""
    try:
        compiled = lower().compile()
    except Exception as e:  # the compiler's refusal is the verdict; keep its words
        return Program(name, shapes, resident=resident, error=" ".join(str(e).split())[:400]), None
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Program(name, shapes, arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                   temporaries=memory.temp_size_in_bytes, aliased=memory.alias_size_in_bytes, resident=resident,
                   flops=float((cost or {}).get("flops", 0.0))), compiled


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (its largest shard of each leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch_structs(mesh, fields: dict[str, tuple], leading_axes: int = 0):
    from exprl_jax import sharding as shd

    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape), leading_axes))
            for k, (shape, dtype) in fields.items()}


_RNG = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype)
_SCALAR = jax.ShapeDtypeStruct((), jnp.int32)


class StepPlan:
    """The abstract, sharded arrays one step of `cfg` keeps on `mesh`, and the programs it compiles."""

    def __init__(self, cfg, mesh, *, prompt_tokens: int, teacher_prompt_tokens: int):
        from exprl_jax.batching import batch_shards, round_up
        from exprl_jax.build import model_config
        from exprl_jax.methods import METHOD_SPECS
        from exprl_jax.models.transformer import init_params
        from exprl_jax.rollout.weights import rollout_model_config, rollout_shardings
        from exprl_jax.sampling import PROMPT_MULTIPLE
        from exprl_jax.train_state import TrainState, make_optimizer, state_shardings

        self.cfg, self.mesh = cfg, mesh
        self.model_cfg = model_config(cfg)
        self.spec = METHOD_SPECS[cfg.method]
        self.optimizer = make_optimizer(cfg.optim)
        self.shardings = state_shardings(self.model_cfg, self.optimizer, mesh)
        params = jax.eval_shape(lambda: init_params(self.model_cfg, jax.random.key(0)))
        self.state = _abstract(TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                                          jax.eval_shape(self.optimizer.init, params)), self.shardings)
        self.needs_ref = self.spec.teacher or (self.spec.samples and cfg.loss.kl_coef > 0)
        self.shards = batch_shards(mesh)
        self.P = round_up(prompt_tokens, PROMPT_MULTIPLE)
        self.teacher_P = round_up(teacher_prompt_tokens, PROMPT_MULTIPLE)
        self.R = cfg.rollout.max_new_tokens
        rollout_dtype = "" if cfg.rollout.dtype == "auto" else cfg.rollout.dtype
        self.rollout_cfg = rollout_model_config(self.model_cfg, rollout_dtype)
        rollout_params = jax.eval_shape(lambda: init_params(self.rollout_cfg, jax.random.key(0)))
        self.rollout_params = _abstract(rollout_params, rollout_shardings(self.rollout_cfg, mesh))
        self.train_bytes = per_chip_bytes(self.state)
        self.ref_bytes = per_chip_bytes(self.state.params) if self.needs_ref else 0

    # ---- the update and the log-prob passes ----
    def train_programs(self) -> list[Program]:
        from exprl_jax.batching import micro_rows, round_up
        from exprl_jax.methods import batch_ndims, loss_mask_key, make_loss_fn
        from exprl_jax.rollouts import _score
        from exprl_jax.train_state import make_train_step

        cfg, mesh = self.cfg, self.mesh
        if self.spec.samples:
            rows = cfg.loss.ppo_mini_batch_size or cfg.rollout.prompts_per_step * cfg.rollout.group_size
            length = self.P + self.R
        else:
            rows, length = cfg.train.batch_size, cfg.train.seq_len
        m = micro_rows(rows, cfg.train.micro_batch_size, self.shards)
        n = round_up(rows, m) // m
        ndims = batch_ndims(cfg.method)
        widths = {"tokens": length, "attention_mask": length, "loss_mask": length - 1}
        fields = {k: ((n, m, widths.get(k, self.R)), jnp.int32 if k in ("tokens", "attention_mask") else jnp.float32)
                  for k in ndims}
        step = make_train_step(make_loss_fn(cfg.method, self.model_cfg, cfg.loss, cfg.rollout.temperature),
                               self.optimizer, self.shardings, mesh, ndims, loss_mask_key(cfg.method))
        programs = [compile_program("update", f"{n} micro x {m} rows x {length} tokens",
                                    lambda: step.lower(self.state, _batch_structs(mesh, fields, 1), _RNG),
                                    resident=self.ref_bytes)[0]]
        passes = []
        if self.spec.samples and (cfg.loss.kl_coef > 0 or cfg.rollout.recompute_logprobs != "false"):
            passes.append(("reference/recompute log-probs", self.P))
        if self.spec.teacher:
            passes.append(("teacher log-probs", self.teacher_P))
        for name, prompt in passes:
            batch = _batch_structs(mesh, {"tokens": ((m, prompt + self.R), jnp.int32),
                                          "attention_mask": ((m, prompt + self.R), jnp.int32),
                                          "response_mask": ((m, self.R), jnp.float32)})
            programs.append(compile_program(
                name, f"{m} rows x {prompt + self.R} tokens",
                lambda batch=batch: _score.lower(self.state.params, batch, model_cfg=self.model_cfg,
                                                 temperature=float(cfg.rollout.temperature), mesh=mesh),
                resident=self.train_bytes)[0])
        return programs

    # ---- the rollout engine ----
    def rollout_programs(self, slots: int, with_prefill: bool = True) -> tuple[list[Program], dict]:
        """prefill / insert / decode at `slots` cache slots, and the KV-cache figures. Without the prefill, insert
        is planned with the prefill's output shapes but default shardings."""
        from exprl_jax import sharding as shd
        from exprl_jax.rollout.engine import Engine, decode, init_state, insert, prefill
        from exprl_jax.rollout.tokens import SamplingParams

        cfg, mesh = self.cfg, self.mesh
        rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        sampling = SamplingParams(float(cfg.rollout.temperature), cfg.rollout.top_p, cfg.rollout.top_k, (1,), 0)
        engine = Engine(self.rollout_cfg, max_new_tokens=self.R, sampling=sampling, slots=slots, mesh=mesh)
        statics = dict(config=self.rollout_cfg, mesh=mesh)
        init = init_state.lower(slots=engine.slots, cache_len=engine.cache_len(self.P), rows=rows,
                                max_new_tokens=self.R, pad_id=0, attention=engine.attention, **statics).compile()
        state = _abstract(jax.eval_shape(lambda: init_state(
            slots=engine.slots, cache_len=engine.cache_len(self.P), rows=rows, max_new_tokens=self.R, pad_id=0,
            config=self.rollout_cfg, mesh=None, attention=engine.attention)), init.output_shardings)
        cache_bytes = per_chip_bytes(state.caches)
        resident = self.train_bytes + self.ref_bytes
        k = engine.refill_rows
        prompts = _batch_structs(mesh, {"tokens": ((k, self.P), jnp.int32), "lengths": ((k,), jnp.int32),
                                        "rows": ((k,), jnp.int32)})
        programs, out_shardings = [], None
        if with_prefill:
            pre, pre_compiled = compile_program(
                "rollout prefill", f"{k} rows x {self.P} prompt tokens",
                lambda: prefill.lower(self.rollout_params, prompts["tokens"], prompts["lengths"], prompts["rows"],
                                      _RNG, sampling=sampling, **statics),
                resident=resident + per_chip_bytes(state))
            programs.append(pre)
            out_shardings = None if pre_compiled is None else pre_compiled.output_shardings
        if out_shardings is not None or not with_prefill:
            out = jax.eval_shape(lambda p, t, n, r: prefill(p, t, n, r, jax.random.key(0), sampling=sampling,
                                                            config=self.rollout_cfg, mesh=None),
                                 self.rollout_params, prompts["tokens"], prompts["lengths"], prompts["rows"])
            batch = lambda x: shd.batch_sharding(mesh, x.ndim)  # noqa: E731
            prefilled = _abstract(out, out_shardings or jax.tree.map(batch, out))
            slot_ids = jax.ShapeDtypeStruct((k,), jnp.int32)
            programs.append(compile_program(
                "rollout insert (refill)", f"{k} rows into {engine.slots} slots",
                lambda: insert.lower(state, prefilled, prefilled[1], prefilled[2], prompts["rows"], slot_ids,
                                     prompts["lengths"], sampling=sampling, mesh=mesh),
                resident=resident + per_chip_bytes(self.rollout_params))[0])
        programs.append(compile_program(
            "rollout decode", f"{engine.slots} slots x {engine.cache_len(self.P)} positions",
            lambda: decode.lower(self.rollout_params, state, _RNG, _SCALAR, _SCALAR, _SCALAR, sampling=sampling,
                                 **statics),
            resident=resident)[0])
        kv_per_token = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.caches)) \
            // (engine.slots * engine.cache_len(self.P))
        weights = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.rollout_params))
        figures = {"slots": engine.slots, "kv_bytes_per_token": kv_per_token, "cache_bytes_per_chip": cache_bytes,
                   "rollout_weight_bytes": weights, "weight_replicas": self.shards}
        return programs, figures

    def largest_slots(self, hbm: int) -> int:
        """The most cache slots (a multiple of the batch shards, at most the step's rows) whose insert and decode
        still fit, by doubling then bisecting on compiled programs."""
        from exprl_jax.batching import round_up

        rows = round_up(self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size, self.shards)

        def fits(slots):
            return all(not p.error and p.peak <= hbm for p in self.rollout_programs(slots, with_prefill=False)[0])

        lo, hi = 0, self.shards
        while hi <= rows and fits(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, rows + self.shards)
        while hi - lo > self.shards:
            mid = round_up((lo + hi) // 2, self.shards)
            if mid >= hi:
                break
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def report(programs: list[Program], topology: str, hbm: int, notes: list[str] = ()) -> tuple[str, bool]:
    """The table, the notes and the verdict line."""
    def gib(x):
        return f"{x / GiB:7.2f}"

    lines = [f"{'program':<30} {'shapes':<36} {'args':>7} {'temps':>7} {'outs':>7} {'resid.':>7} {'peak':>7} "
             f"{'HBM':>5} {'TFLOP*':>8}  (GiB per chip)"]
    failed = None
    for p in programs:
        if p.error:
            lines.append(f"{p.name:<30} {p.shapes:<36} does not compile: {p.error}")
            failed = failed or f"{p.name}: {p.error[:200]}"
            continue
        fits = p.peak <= hbm
        lines.append(f"{p.name:<30} {p.shapes:<36} {gib(p.arguments)} {gib(p.temporaries)} {gib(p.outputs)} "
                     f"{gib(p.resident)} {gib(p.peak)} {hbm / GiB:5.0f} {p.flops / 1e12:8.2f}{'' if fits else '  OVER'}")
        if not fits:
            failed = failed or f"{p.name}: peak {p.peak / GiB:.1f} GiB of {hbm / GiB:.0f} GiB per chip"
    lines.append("resid. = arrays alive beside the program (training state, reference params, rollout weights, KV "
                 "cache); * XLA's cost analysis counts each loop body (layers, micro-batches, decode steps) once")
    lines += list(notes)
    peak = max((p.peak for p in programs if not p.error), default=0)
    verdict = (f"fits on {topology}: no ({failed})" if failed else
               f"fits on {topology}: yes (peak {peak / GiB:.1f} GiB of {hbm / GiB:.0f} GiB per chip)")
    return "\n".join(lines + [verdict]), failed is None


def plan(cfg, topology: str, *, prompt_tokens: int = 0, teacher_prompt_tokens: int = 0,
         search_slots: bool = True) -> tuple[str, bool]:
    """Compiles one step of `cfg` for `topology`; returns (printable report, fits)."""
    from exprl_jax import config as config_lib

    cfg = config_lib.resolve(cfg)
    from jax.experimental.compilation_cache import compilation_cache

    # a deviceless TPU executable cannot be read back from the persistent cache, so none is written or read; JAX
    # decides whether to use the cache once per process, so the decision is reset on the way in and out
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return _plan(cfg, topology, prompt_tokens, teacher_prompt_tokens, search_slots)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
        compilation_cache.reset_cache()


def _plan(cfg, topology, prompt_tokens, teacher_prompt_tokens, search_slots):
    from exprl_jax import sharding as shd

    mesh = shd.make_mesh(cfg.mesh.shape, devices=topology_devices(topology))
    prompt_tokens = prompt_tokens or cfg.rollout.max_prompt_tokens
    if prompt_tokens < 1 and cfg.method != "sft":
        raise ValueError("plan: set rollout.max_prompt_tokens (or --prompt_tokens): the longest prompt decides memory")
    hbm = TOPOLOGIES[topology][1]
    step = StepPlan(cfg, mesh, prompt_tokens=prompt_tokens, teacher_prompt_tokens=teacher_prompt_tokens or
                    2 * prompt_tokens)
    programs, notes = step.train_programs(), []
    if step.spec.samples:
        rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        rollout, fig = step.rollout_programs(cfg.rollout.max_concurrent_rows or rows)
        programs += rollout
        kv = fig["kv_bytes_per_token"]
        notes.append(f"rollout: {rows} rows through {fig['slots']} slots; KV cache {kv / 1024:.0f} KiB per token, "
                     f"{fig['cache_bytes_per_chip'] / GiB:.2f} GiB per chip; a decode step reads the rollout weights "
                     f"({fig['rollout_weight_bytes'] / GiB:.2f} GiB, once per data x fsdp group: x{fig['weight_replicas']}) "
                     f"plus each slot's cache: per generated token "
                     f"{fig['rollout_weight_bytes'] * fig['weight_replicas'] / fig['slots'] / 2**20:.1f} MiB of weights "
                     f"+ {kv / 1024:.0f} KiB x its length ({kv * (prompt_tokens + cfg.rollout.max_new_tokens) / 2**20:.0f} "
                     "MiB at the longest)")
        if search_slots:
            notes.append(f"largest rollout.max_concurrent_rows that fits on {topology}: {step.largest_slots(hbm)}")
    header = (f"{cfg.name} ({cfg.method}) on {topology}: mesh {dict(mesh.shape)}, "
              f"attention={cfg.model.attention_impl}, scan_layers={cfg.model.scan_layers}, remat={cfg.model.remat}, "
              f"logits_chunk={cfg.model.logits_chunk}, micro_batch_size={cfg.train.micro_batch_size}, "
              f"rollout.dtype={step.rollout_cfg.dtype}")
    text, fits = report(programs, topology, hbm, notes)
    return header + "\n" + text, fits


def main(argv):
    from absl import flags

    from exprl_jax.config import ExperimentConfig, from_dict

    del argv
    cfg = from_dict(ExperimentConfig, flags.FLAGS.config.to_dict())
    text, fits = plan(cfg, flags.FLAGS.topology, prompt_tokens=flags.FLAGS.prompt_tokens,
                      teacher_prompt_tokens=flags.FLAGS.teacher_prompt_tokens,
                      search_slots=flags.FLAGS.search_slots)
    print(text, flush=True)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    flags.DEFINE_string("topology", None, f"Cloud TPU slice: {', '.join(sorted(TOPOLOGIES))}")
    flags.DEFINE_integer("prompt_tokens", 0, "longest prompt (default: the config's rollout.max_prompt_tokens)")
    flags.DEFINE_integer("teacher_prompt_tokens", 0, "longest self-distillation teacher prompt (default 2x)")
    flags.DEFINE_bool("search_slots", True, "also find the largest rollout.max_concurrent_rows that fits")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
