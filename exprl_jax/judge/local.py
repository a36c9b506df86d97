"""The `local` judge backend: a judge model run in this process by the project's own sampler, greedily (SPEC §3).

Concurrent `complete` calls are gathered for a short window and decoded together in one `generate` call on a worker
thread, at a small fixed set of padded shapes, so the event loop stays free and XLA compiles each shape once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import Sequence

import jax
import numpy as np

from exprl_jax.judge.backend import Completion
from exprl_jax.judge.templates import prompt_messages_text
from exprl_jax.models.config import ModelConfig
from exprl_jax.sampling import generate
from exprl_jax.tokenizer import eos_ids, pad_id

log = logging.getLogger(__name__)

PROMPT_PAD_MULTIPLE = 16  # the sampler's own prompt padding, used when a bucket would not fit the context


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit the judge model's context."""


@dataclasses.dataclass(frozen=True)
class Reply:
    """One greedy answer. `finish_reason` is "stop" (an EOS ended it) or "length" (max_tokens ran out first)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens, a final EOS included
    latency_s: float

    def to_completion(self) -> Completion:
        return Completion(self.text, None, self.prompt_tokens, self.completion_tokens, self.latency_s)


@dataclasses.dataclass
class _Request:
    prompt: list[int]
    max_tokens: int
    future: asyncio.Future


@dataclasses.dataclass
class _Batcher:
    # An asyncio queue and its worker belong to one event loop; a new loop (asyncio.run per step) gets new ones.
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    worker: asyncio.Task | None = None


def prompt_length_bucket(length: int) -> int:
    """The padded prompt length for a batch whose longest prompt is `length`: 16, 32, 48, 64, 96, 128, 192, ...
    (powers of two and 1.5x them), so few shapes are compiled and at most a third of a prompt is padding."""
    bucket = PROMPT_PAD_MULTIPLE
    while bucket < length:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 and bucket >= 32 else 1 << bucket.bit_length()
    return bucket


class LocalBackend:
    """ChatBackend over an in-process model: messages → chat template (or joined contents) → greedy decode.

    Up to `batch_size` requests that arrive within `batch_window_s` of the first share one `generate` call; the
    rows are padded up to a power of two (capped at `batch_size`, and a multiple of data×fsdp with a mesh) with
    copies of a real prompt. A decode that reaches `max_tokens` without an EOS still returns its text.
    """

    def __init__(self, model_cfg: ModelConfig, params, tokenizer, *, max_tokens: int = 2048, model_name: str = "local",
                 batch_size: int = 16, mesh=None, batch_window_s: float = 0.005):
        if max_tokens < 1 or batch_size < 1 or batch_window_s < 0:
            raise ValueError(f"need max_tokens >= 1, batch_size >= 1 and batch_window_s >= 0; got {max_tokens}, "
                             f"{batch_size}, {batch_window_s}")
        if len(tokenizer) > model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                             f"{model_cfg.vocab_size}")
        self.model_cfg, self.params, self.tokenizer, self.mesh = model_cfg, params, tokenizer, mesh
        self.model, self.max_tokens = model_name, max_tokens
        self.batch_size, self.batch_window_s = batch_size, batch_window_s
        self.decoding = {"temperature": 0.0, "max_tokens": max_tokens}
        model_eos = model_cfg.eos_token_id
        model_eos = () if model_eos is None else (model_eos,) if isinstance(model_eos, int) else tuple(model_eos)
        self.eos_ids = tuple(sorted(set(eos_ids(tokenizer)) | set(model_eos)))
        self.pad_id = pad_id(tokenizer)
        self.generate_calls = 0  # `generate` calls made so far (each decodes one batch)
        self._rng = jax.random.key(0)  # greedy decoding never draws from it
        self._device_lock = threading.Lock()  # one decode at a time, even across event loops
        self._batcher: _Batcher | None = None

    @classmethod
    def from_hf(cls, path: str, *, max_tokens: int = 2048, model_name: str | None = None, mesh=None,
                **kwargs) -> "LocalBackend":
        """A backend over a HF model directory (config.json, safetensors, tokenizer.json); named after the
        directory unless `model_name` is given."""
        from exprl_jax.models.hf import load_hf, load_tokenizer

        model_cfg, params = load_hf(path, mesh=mesh)
        name = model_name or os.path.basename(os.path.normpath(path))
        return cls(model_cfg, params, load_tokenizer(path), max_tokens=max_tokens, model_name=name, mesh=mesh,
                   **kwargs)

    # ---- requests ----
    def encode(self, messages: Sequence[dict]) -> list[int]:
        """The prompt tokens for chat messages (`role` and string `content` each); ValueError when malformed."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        prompt = self.tokenizer.encode(prompt_messages_text(self.tokenizer, list(messages)), add_special_tokens=False)
        if not prompt:
            raise ValueError("the messages render to an empty prompt")
        return prompt

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """PromptTooLong unless the prompt, padded as the sampler pads it, plus max_tokens fits the context."""
        padded = -(-prompt_tokens // PROMPT_PAD_MULTIPLE) * PROMPT_PAD_MULTIPLE
        if padded + max_tokens > self.model_cfg.max_position_embeddings:
            raise PromptTooLong(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the judge "
                                f"model's context of {self.model_cfg.max_position_embeddings} tokens")

    async def reply(self, messages: Sequence[dict], *, max_tokens: int | None = None) -> Reply:
        """Greedy answer to `messages`, at most `max_tokens` (default: the backend's) new tokens. Raises
        ValueError for malformed messages or a prompt too long for the model; the decode's own errors pass on."""
        started = time.monotonic()
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_tokens:
            raise ValueError(f"max_tokens must be in [1, {self.max_tokens}], got {max_tokens}")
        prompt = self.encode(messages)
        self.check_fits(len(prompt), max_tokens)
        batcher = self._loop_batcher()
        future = batcher.loop.create_future()
        batcher.queue.put_nowait(_Request(prompt, max_tokens, future))
        tokens, finished = await future
        text = self.tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
        return Reply(text, "stop" if finished else "length", len(prompt), len(tokens), time.monotonic() - started)

    async def complete(self, messages: Sequence[dict]) -> Completion:
        """ChatBackend: never raises; a failure is `Completion(None, reason)` and the caller marks it unscored."""
        started = time.monotonic()
        try:
            return (await self.reply(messages)).to_completion()
        except ValueError as err:
            log.warning("local judge rejected a request: %s", err)
            reason = "prompt_too_long" if isinstance(err, PromptTooLong) else "bad_request"
            return Completion(None, reason, latency_s=time.monotonic() - started)
        except Exception as err:  # a decode failure (device OOM, ...) must not take down the whole reward step
            log.exception("local judge decode failed")
            return Completion(None, f"local_error:{type(err).__name__}", latency_s=time.monotonic() - started)

    async def aclose(self) -> None:
        """Stops this loop's batch worker; requests still waiting fail (`complete` gives a reason, never hangs)."""
        batcher, self._batcher = self._batcher, None
        if batcher is None or batcher.loop is not asyncio.get_running_loop():
            return
        if batcher.worker is not None:
            batcher.worker.cancel()
        while not batcher.queue.empty():
            request = batcher.queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(RuntimeError("LocalBackend closed"))

    # ---- batching ----
    def _loop_batcher(self) -> _Batcher:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop or self._batcher.worker.done():
            self._batcher = _Batcher(loop, asyncio.Queue())
            self._batcher.worker = loop.create_task(self._serve_batches(self._batcher.queue))
        return self._batcher

    async def _serve_batches(self, queue: asyncio.Queue) -> None:
        """Forever: wait for a request, gather more for `batch_window_s` (or until `batch_size`), decode them.
        Requests that arrive during a decode are already waiting when it ends, so under load batches fill up."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.batch_window_s
            while len(batch) < self.batch_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining_s))
                except TimeoutError:
                    break
            try:
                await self._decode_batch([r for r in batch if not r.future.done()])  # skips callers that gave up
            finally:  # cancelled mid-decode (aclose, loop shutdown): no caller may wait forever
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(RuntimeError("LocalBackend closed before answering"))

    async def _decode_batch(self, batch: list[_Request]) -> None:
        for max_tokens in sorted({r.max_tokens for r in batch}):  # max_new_tokens is a static shape
            group = [r for r in batch if r.max_tokens == max_tokens]
            try:
                results = await asyncio.to_thread(self._decode, [r.prompt for r in group], max_tokens)
            except Exception as err:  # handed to each caller, whose `complete` turns it into a reason
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(err)
                continue
            for r, result in zip(group, results):
                if not r.future.done():
                    r.future.set_result(result)

    def _padded_rows(self, n: int) -> int:
        rows = min(1 << (n - 1).bit_length(), max(self.batch_size, n))
        if self.mesh is not None:
            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            rows = -(-rows // shards) * shards
        return rows

    def _decode(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], bool]]:
        """Runs on a worker thread: one greedy `generate` over the prompts, padded to a bucketed shape.
        Returns each prompt's generated tokens and whether an EOS ended them."""
        rows = prompts + [prompts[0]] * (self._padded_rows(len(prompts)) - len(prompts))
        bucket = prompt_length_bucket(max(len(p) for p in prompts))
        if bucket + max_tokens > self.model_cfg.max_position_embeddings:
            bucket = PROMPT_PAD_MULTIPLE  # `check_fits` guaranteed the sampler's own padding fits
        with self._device_lock:
            self.generate_calls += 1
            out = generate(self.model_cfg, self.params, rows, self._rng, max_new_tokens=max_tokens, temperature=0.0,
                           eos_ids=self.eos_ids, pad_id=self.pad_id, mesh=self.mesh, prompt_multiple=bucket)
            tokens_NT, lengths_N, truncated_N = (np.asarray(jax.device_get(x))
                                                 for x in (out.tokens, out.lengths, out.truncated))
        return [(tokens_NT[i, :lengths_N[i]].tolist(), not bool(truncated_N[i])) for i in range(len(prompts))]
