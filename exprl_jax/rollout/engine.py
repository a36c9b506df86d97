"""Continuous-batching rollout engine: any number of rows through a fixed number of cache slots.

Three jitted programs and a small host loop. `prefill` runs a batch of waiting prompts (the prompt tokens only,
logits only at each row's last prompt position) and samples each row's first token; `insert` writes them into free
slots of the donated engine state and records that token; `decode` steps every slot one token at a time, each at
its own length (decode attention covers only the filled part of the cache), until enough slots have finished to
refill them. Once no row waits, `compact` moves the live rows into half as many slots whenever they fit, so rows
that have ended stop costing decode steps (the tail of a batch whose lengths spread 2k-16k, or 1-256 on the CPU
benchmark, where it gave 1.7x the new tokens/s of the same engine without it, side by side). Finished rows go
straight into row-indexed outputs, so results never depend on the schedule: row i's tokens are a function of
(params, prompt i, rng, i) only (the noise of token t of row i is drawn from fold_in(fold_in(rng, i), t)); its log-
probs too, bit for bit, as long as its steps run in batches of the same size (XLA:CPU may order a row's sums
differently in a smaller batch: a last-bit change, which compaction and `max_concurrent_rows` can cause).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exprl_jax import distributed
from exprl_jax import sharding as shd
from exprl_jax.batching import batch_shards, round_up
from exprl_jax.models.config import ModelConfig
from exprl_jax.models import decode_attention as da
from exprl_jax.models.matmul import padded_small_weights
from exprl_jax.models.transformer import forward_with_cache, init_cache
from exprl_jax.rollout.tokens import SamplingParams, sample_rows
from exprl_jax.rollout.weights import untied_head

COMPACT_MIN_SLOTS = 4  # the fewest slots compaction moves live rows into (0 in Engine: never compact)


class EngineState(NamedTuple):
    caches: tuple  # per layer SlotCache (k, v: blocks [S, K, B, H]) or PagedSlotCache (kv [S, L, 2K, H])
    row: jax.Array  # [S] int32: the row in each slot, -1 if free
    step: jax.Array  # [S] int32: response index of `token`
    length: jax.Array  # [S] int32: tokens written into the slot's cache
    token: jax.Array  # [S] int32: sampled and recorded, not yet fed to the model
    logprob: jax.Array  # [S] float32
    out_tokens: jax.Array  # [N, R] int32, pad after the end
    out_logprobs: jax.Array  # [N, R] float32, 0 after the end
    out_lengths: jax.Array  # [N] int32, generated tokens including the EOS
    out_truncated: jax.Array  # [N] bool
    busy_slot_steps: jax.Array  # [] int32: decode slot-steps spent on a live row (the rest is waste)
    slot_steps: jax.Array  # [] int32


def _constrain_state(state: EngineState) -> EngineState:
    rows = ("activation_batch",)
    return state._replace(
        caches=tuple(jax.tree.map(lambda x, axes=c.AXES: shd.constrain(x, axes), c) for c in state.caches),
        **{f: shd.constrain(getattr(state, f), rows) for f in ("row", "step", "length", "token", "logprob")})


@functools.partial(jax.jit, static_argnames=("config", "slots", "cache_len", "rows", "max_new_tokens", "pad_id",
                                             "mesh", "attention"))
def init_state(*, config: ModelConfig, slots: int, cache_len: int, rows: int, max_new_tokens: int, pad_id: int,
               mesh, attention: str = "jnp") -> EngineState:
    """`attention`: the resolved decode attention ("jnp" or "paged"), which fixes the cache layout."""
    with shd.use_mesh(mesh):
        layout = da.cache_type(attention)
        block = da.cache_block(cache_len, config.decode_block_kv)  # the block cache_length rounded to
        caches = tuple(layout.zeros(config.num_kv_heads, slots, cache_len, config.head_dim, config.jnp_dtype, block)
                       for _ in range(config.num_layers))
        zeros = jnp.zeros((slots,), jnp.int32)
        rows_axis = ("activation_batch", None)  # outputs by row, split like the slots (rows is padded to match)
        return _constrain_state(EngineState(
            caches, jnp.full((slots,), -1, jnp.int32), zeros, zeros, zeros, jnp.zeros((slots,), jnp.float32),
            shd.constrain(jnp.full((rows, max_new_tokens), pad_id, jnp.int32), rows_axis),
            shd.constrain(jnp.zeros((rows, max_new_tokens), jnp.float32), rows_axis),
            shd.constrain(jnp.zeros((rows,), jnp.int32), rows_axis[:1]),
            shd.constrain(jnp.zeros((rows,), bool), rows_axis[:1]), jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("config", "sampling", "mesh"))
def prefill(params, prompts_RP, prompt_lengths_R, rows_R, rng, *, config: ModelConfig, sampling: SamplingParams,
            mesh):
    """Prompts [R, P] (left-aligned, right-padded) -> (per-layer LayerCache [R, P, K, H], first token, log-prob)."""
    with shd.use_mesh(mesh):
        R, P = prompts_RP.shape
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
        kv_valid = (positions < prompt_lengths_R[:, None]).astype(jnp.int32)
        logits, caches = forward_with_cache(config, params, prompts_RP, positions, init_cache(config, R, P), 0,
                                            kv_valid, logits_at=prompt_lengths_R - 1)
        token, logprob = sample_rows(rng, rows_R, jnp.zeros_like(rows_R), logits, sampling)
        return caches, token, logprob


def _eos(sampling: SamplingParams):
    return jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)


def _record(s: EngineState, live, token, logprob, step, eos) -> tuple[EngineState, jax.Array]:
    """Writes each live slot's sampled token at response index `step` of its row and ends the rows whose token is
    an EOS or the last one allowed; returns the state and the slots still live (to be fed to the model)."""
    N, R = s.out_tokens.shape
    target = jnp.where(live, s.row, N)  # N: out of range, dropped
    is_eos = jnp.isin(token, eos)
    done = live & (is_eos | (step + 1 >= R))
    ended = jnp.where(done, s.row, N)
    s = s._replace(out_tokens=s.out_tokens.at[target, step].set(token, mode="drop"),
                   out_logprobs=s.out_logprobs.at[target, step].set(logprob, mode="drop"),
                   out_lengths=s.out_lengths.at[ended].set(step + 1, mode="drop"),
                   out_truncated=s.out_truncated.at[ended].set(~is_eos, mode="drop"))
    return s, live & ~done


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("sampling", "mesh"))
def insert(state: EngineState, prefilled, token_R, logprob_R, rows_R, slots_R, prompt_lengths_R, *,
           sampling: SamplingParams, mesh):
    """Puts prefilled rows into slots (a slot index >= S marks a padding row: dropped) and records their first
    token; a row that ends with it (an EOS, or max_new_tokens = 1) leaves its slot free."""
    with shd.use_mesh(mesh):
        caches, _, _ = prefilled
        new_caches = tuple(c.put(slots_R, p.k, p.v) for c, p in zip(state.caches, caches))  # at (slots, :P)
        S = state.row.shape[0]
        valid = slots_R < S
        in_slot = lambda x: jnp.zeros((S,), x.dtype).at[slots_R].set(x, mode="drop")  # noqa: E731
        row, token, logprob = in_slot(rows_R), in_slot(token_R), in_slot(logprob_R)
        occupied = jnp.zeros((S,), bool).at[slots_R].set(valid, mode="drop")
        s = state._replace(row=jnp.where(occupied, row, state.row))
        s, live = _record(s, occupied, token, logprob, jnp.zeros((S,), jnp.int32), _eos(sampling))
        keep = lambda new, old: jnp.where(occupied, new, old)  # noqa: E731
        return _constrain_state(s._replace(
            caches=new_caches, row=jnp.where(occupied & ~live, -1, s.row), step=keep(0, s.step),
            length=keep(in_slot(prompt_lengths_R), s.length), token=keep(token, s.token),
            logprob=keep(logprob, s.logprob)))


def _decode(params, state: EngineState, rng, waiting, refill_rows, max_steps, compact_at=0, *, config: ModelConfig,
            sampling: SamplingParams, mesh) -> EngineState:
    """Decode steps until every slot is free, or `min(refill_rows, waiting)` slots are free while rows wait, or
    no row waits and at most `compact_at` slots are live (the host then moves them into fewer slots), or
    `max_steps` steps ran. One step feeds each live slot's last token to the model at the slot's own position,
    samples the next one and records it, ending the row on an EOS or at the length limit (so no step is spent on a
    row that has already ended)."""
    eos = _eos(sampling)

    def keep_going(carry):
        state, i = carry
        live = state.row >= 0
        free = live.shape[0] - live.sum()
        refill_now = (waiting > 0) & (free >= jnp.minimum(refill_rows, waiting))
        compact_now = (waiting == 0) & (live.sum() <= compact_at)
        return live.any() & ~refill_now & ~compact_now & (i < max_steps)

    def step(carry):
        s, i = carry
        live = s.row >= 0
        positions = jnp.where(live, s.length, 0)  # free slots attend to nothing and stretch no loop bound
        with padded_small_weights():  # XLA's dot emitter: faster on CPU (models/matmul.py)
            logits, caches = forward_with_cache(config, params, s.token[:, None], positions[:, None], s.caches, 0,
                                                None, logits_at=0)
        token, logprob = sample_rows(rng, s.row, s.step + 1, logits, sampling)
        s, still = _record(s, live, token, logprob, s.step + 1, eos)
        s = _constrain_state(s._replace(
            caches=caches, row=jnp.where(still, s.row, -1), step=jnp.where(live, s.step + 1, s.step),
            length=jnp.where(live, s.length + 1, s.length), token=jnp.where(live, token, s.token),
            logprob=jnp.where(live, logprob, s.logprob),
            busy_slot_steps=s.busy_slot_steps + live.sum(), slot_steps=s.slot_steps + live.shape[0]))
        return s, i + 1

    with shd.use_mesh(mesh):
        state, _ = jax.lax.while_loop(keep_going, step, (state, jnp.int32(0)))
        return state


_DECODE_JIT = dict(donate_argnums=(1,), static_argnames=("config", "sampling", "mesh"))
decode = jax.jit(_decode, **_DECODE_JIT)
# XLA:CPU hands dots to YNNPACK by default. On the decode step's skinny matmuls (M = the slots: 32 on the CPU
# benchmark) XLA's own dot emitter is faster: engine new tokens/s +29% on one core of the 2-core benchmark VM
# (alternating processes), same tokens, log-probs within 2e-6. YNNPACK stays for the wide matmuls of prefill and
# training, where it was ~10% faster in a matmul loop. Only the CPU program gets the option: other backends do not
# read xla_cpu_* flags.
CPU_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
decode_cpu = jax.jit(_decode, compiler_options=CPU_DECODE_COMPILER_OPTIONS, **_DECODE_JIT)


def decode_program(platform: str):
    """The jitted decode for a platform ("cpu", "gpu", "tpu")."""
    return decode_cpu if platform == "cpu" else decode


@functools.partial(jax.jit, static_argnames=("slots", "mesh"))
def _compaction_order(row, *, slots: int, mesh):
    """The `slots` slots to keep: the live ones first (in slot order), then free ones."""
    with shd.use_mesh(mesh):
        return jnp.argsort(row < 0, stable=True)[:slots]


@functools.partial(jax.jit, static_argnames=("axes", "mesh"))
def _gather_slots(x, keep, *, axes, mesh):
    with shd.use_mesh(mesh):
        return shd.constrain(x[keep], axes)


def _take_slots(x, keep, *, axes, mesh):
    out = jax.block_until_ready(_gather_slots(x, keep, axes=axes, mesh=mesh))
    x.delete()  # freed before the next array is gathered (donation cannot alias a smaller output)
    return out


def compact(state: EngineState, slots: int, mesh) -> EngineState:
    """The live slots (and free ones after them) moved into the first `slots` slots; rows keep their caches and
    positions, and the row-indexed outputs are untouched, so no row's result depends on where it sits. One cache
    array at a time, each freed once gathered: at most one array's smaller copy exists beside the full cache."""
    keep = _compaction_order(state.row, slots=slots, mesh=mesh)
    caches = tuple(jax.tree.map(lambda x, axes=c.AXES: _take_slots(x, keep, axes=axes, mesh=mesh), c)
                   for c in state.caches)
    return state._replace(caches=caches, **{f: _take_slots(getattr(state, f), keep, axes=("activation_batch",),
                                                           mesh=mesh)
                                            for f in ("row", "step", "length", "token", "logprob")})


class Engine:
    """Samples rows through `slots` cache slots; `refill_rows` prompts are prefilled at a time (both rounded up
    to a multiple of the mesh's batch shards; on CPU, rows that all fit in the slots are prefilled by one call). `compact_min_slots`: the fewest slots compaction moves live rows
    into (0: never compact, every decode step runs all `slots`)."""

    def __init__(self, config: ModelConfig, *, max_new_tokens: int, sampling: SamplingParams, slots: int,
                 refill_rows: int = 0, mesh=None, max_steps_per_call: int = 1 << 30,
                 compact_min_slots: int = COMPACT_MIN_SLOTS):
        shards = batch_shards(mesh)
        self.config, self.max_new_tokens, self.sampling, self.mesh = config, max_new_tokens, sampling, mesh
        self.slots = round_up(slots, shards)
        self.refill_rows = round_up(min(refill_rows or max(1, self.slots // 4), self.slots), shards)
        # once no row waits, live rows move into half as many slots whenever they fit (down to compact_min_slots):
        # ended rows then stop costing decode steps, one compiled decode per slot count
        self.slot_counts = [self.slots]
        while compact_min_slots > 0:
            half = round_up(self.slot_counts[-1] // 2, shards)
            if half >= self.slot_counts[-1] or half < max(compact_min_slots, shards):
                break
            self.slot_counts.append(half)
        self.max_steps_per_call = max_steps_per_call
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        self.attention = da.resolve_impl(config.decode_attention_impl, config.head_dim, platform)
        self.decode = decode_program(platform)
        self.untie_head_on_cpu = platform == "cpu" and config.tie_embeddings  # rollout/weights.untied_head
        # on CPU, rows that all fit in the slots are prefilled by one call instead of refill_rows at a time: each
        # call streams every weight once, which dominates a small batch (Qwen3-0.6B, 8 rows of 16 tokens, one
        # core: four calls of 2 rows 5.4-7.0 s, one of 8 rows 2.5-2.7 s). Elsewhere refill_rows also bounds the
        # prefill memory that `plan` checks
        self.prefill_all_on_cpu = platform == "cpu"

    def cache_len(self, prompt_width: int) -> int:
        """Cache positions per slot: the prompt area + the response (whole pages of the TPU kernel)."""
        return da.cache_length(self.attention, prompt_width + self.max_new_tokens, self.config.decode_block_kv)

    def run(self, params, prompts: Sequence[Sequence[int]], rng, *, prompt_width: int,
            order: Sequence[int] | None = None) -> tuple:
        """All rows of `prompts` -> host arrays (tokens [N, R], logprobs, lengths, truncated, slot utilisation).
        Rows enter free slots in `order` (default: by index); the results do not depend on it."""
        n = len(prompts)
        if not n:
            raise ValueError("generate: no prompts")
        order = list(range(n)) if order is None else [int(i) for i in order]
        if sorted(order) != list(range(n)):
            raise ValueError(f"order must be a permutation of range({n})")
        config = self.config
        if self.untie_head_on_cpu:
            config, params = untied_head(config, params)
        statics = dict(config=config, mesh=self.mesh)
        state = init_state(slots=self.slots, cache_len=self.cache_len(prompt_width),
                           rows=round_up(n, batch_shards(self.mesh)), max_new_tokens=self.max_new_tokens,
                           pad_id=self.sampling.pad_id, attention=self.attention, **statics)
        next_row, free, slots = 0, list(range(self.slots)), self.slots
        # rows per prefill call: fixed for a given engine and row count, so a row's result never depends on which
        # call it lands in (results are bitwise independent of `order`)
        per_call = round_up(n, batch_shards(self.mesh)) if self.prefill_all_on_cpu and n <= self.slots \
            else self.refill_rows
        while True:
            while next_row < n and free:
                take = min(len(free), per_call, n - next_row)
                state = self._refill(params, config, state, prompts, rng, order[next_row:next_row + take],
                                     free[:take], prompt_width, per_call)
                next_row, free = next_row + take, free[take:]
            if next_row >= n and len(free) == slots:
                break
            smaller = [c for c in self.slot_counts if c < slots]
            state = self.decode(params, state, rng, jnp.int32(n - next_row), jnp.int32(self.refill_rows),
                                jnp.int32(self.max_steps_per_call), jnp.int32(smaller[0] if smaller else 0),
                                sampling=self.sampling, **statics)
            row = distributed.to_host(state.row)
            live = int((row >= 0).sum())
            if next_row >= n and live and smaller and live <= smaller[0]:
                slots = min(c for c in smaller if c >= live)
                state = compact(state, slots=slots, mesh=self.mesh)
                row = distributed.to_host(state.row)
            free = [int(s) for s in np.flatnonzero(row < 0)]
        out = [distributed.to_host(x) for x in (state.out_tokens, state.out_logprobs, state.out_lengths,
                                                state.out_truncated, state.busy_slot_steps, state.slot_steps)]
        return tuple(np.asarray(x)[:n] for x in out[:4]) + (float(out[4]) / max(int(out[5]), 1),)

    def _refill(self, params, config, state, prompts, rng, rows, slots, width, k):
        """Prefills `rows` (at most `k`, padded to `k`) into cache `slots`."""
        tokens = np.zeros((k, width), np.int32)
        lengths = np.ones((k,), np.int32)
        row_ids = np.zeros((k,), np.int32)
        slot_ids = np.full((k,), self.slots, np.int32)  # padding rows go to slot S: dropped by `insert`
        for j, (r, s) in enumerate(zip(rows, slots)):
            tokens[j, :len(prompts[r])] = prompts[r]
            lengths[j], row_ids[j], slot_ids[j] = len(prompts[r]), r, s
        args = (tokens, lengths, row_ids)
        if self.mesh is not None:
            args = tuple(jax.device_put(x, shd.batch_sharding(self.mesh, x.ndim)) for x in args)
        prefilled = prefill(params, *args, rng, config=config, sampling=self.sampling, mesh=self.mesh)
        return insert(state, prefilled, prefilled[1], prefilled[2], args[2], slot_ids, args[1],
                      sampling=self.sampling, mesh=self.mesh)
