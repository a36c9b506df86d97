"""The local judge backend and its OpenAI-compatible server on a tiny random model: greedy answers equal the
sampler's, concurrent requests share decodes, the real `python -m exprl_jax.serve` answers the project's HTTP
client, and a judge that writes no `Score:` line leaves every rollout unscored, never 0 (SPEC §3)."""
import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import pytest

import exprl_jax.judge.local as local_module
from exprl_jax.judge.client import JudgeClientConfig, OpenAIChatClient
from exprl_jax.judge.local import LocalBackend
from exprl_jax.judge.reward import JudgeReward
from exprl_jax.models.config import ModelConfig
from exprl_jax.models.hf import save_hf
from exprl_jax.models.transformer import init_params
from exprl_jax.rewards.base import RewardBatch, score_sync
from exprl_jax.sampling import generate
from exprl_jax.judge.templates import prompt_messages_text
from exprl_jax.tokenizer import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 16
MODEL_NAME = "tiny-judge"
QUESTIONS = [[{"role": "system", "content": "Grade the answer."},
              {"role": "user", "content": f"Problem {i}: what is {i} + {i}? Answer: {2 * i}"}] for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen3-shaped model with the character tokenizer, saved as a HF directory."""
    tokenizer = char_tokenizer()
    # vocab = the tokenizer's size, so every generated id decodes; a context long enough for a judge template
    config = ModelConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=4096, eos_token_id=1,
                              pad_token_id=0)
    path = str(tmp_path_factory.mktemp(MODEL_NAME))
    save_hf(path, config, init_params(config, jax.random.key(0)))
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backend(model_dir):
    return LocalBackend.from_hf(model_dir, max_tokens=MAX_TOKENS, model_name=MODEL_NAME, batch_size=8)


def direct_greedy_text(backend, messages) -> str:
    """The same answer computed without the backend: one greedy `generate` over the rendered prompt."""
    prompt = backend.tokenizer.encode(prompt_messages_text(backend.tokenizer, messages), add_special_tokens=False)
    out = generate(backend.model_cfg, backend.params, [prompt], jax.random.key(7), max_new_tokens=MAX_TOKENS,
                   temperature=0.0, eos_ids=(1,), pad_id=0).to_numpy()
    tokens = out.tokens[0, :out.lengths[0]].tolist()
    return backend.tokenizer.decode(tokens[:-1] if not out.truncated[0] else tokens, skip_special_tokens=True)


async def gather_all(coroutines):
    return await asyncio.gather(*coroutines)


def test_local_backend_is_greedy_and_batches_concurrent_calls(backend, monkeypatch):
    single = asyncio.run(backend.complete(QUESTIONS[0]))
    assert single.text == direct_greedy_text(backend, QUESTIONS[0]) and single.reason is None
    assert single.prompt_tokens == len(backend.encode(QUESTIONS[0]))
    assert 1 <= single.completion_tokens <= MAX_TOKENS
    assert backend.model == MODEL_NAME and backend.decoding == {"temperature": 0.0, "max_tokens": MAX_TOKENS}

    calls = []
    monkeypatch.setattr(local_module, "generate", lambda *a, **kw: calls.append(len(a[2])) or generate(*a, **kw))
    answers = asyncio.run(gather_all(backend.complete(m) for m in QUESTIONS))
    assert 1 <= len(calls) < len(QUESTIONS), calls  # shared decodes
    assert all(rows in (1, 2, 4, 8) for rows in calls), calls  # padded to a power of two
    # each caller gets its own prompt's answer, not a neighbour's
    assert [a.text for a in answers] == [direct_greedy_text(backend, m) for m in QUESTIONS]
    assert len({a.text for a in answers}) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_healthy(proc: subprocess.Popen, base: str, log_path: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not healthy after {limit_s}s:\n{open(log_path).read()}")


def test_served_model_answers_the_project_client_like_the_local_backend(model_dir, backend, tmp_path):
    port, log_path = _free_port(), str(tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "exprl_jax.serve", "--model", model_dir, "--port", str(port),
                                 "--served-model-name", MODEL_NAME, "--max-tokens", "64"],
                                cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(proc, base, log_path)
        assert f"serving {MODEL_NAME} on {base}/v1" in open(log_path).read()
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == MODEL_NAME

        config = JudgeClientConfig(base_url=f"{base}/v1", model=MODEL_NAME, api_key_env=None, max_tokens=MAX_TOKENS,
                                   timeout_s=60, max_retries=0)

        async def ask_all(client):
            try:
                return await asyncio.gather(*(client.complete(m) for m in QUESTIONS))
            finally:
                await client.aclose()

        served = asyncio.run(ask_all(OpenAIChatClient(config)))
        local = asyncio.run(gather_all(backend.reply(m) for m in QUESTIONS))
        assert [c.reason for c in served] == [None] * len(QUESTIONS)
        assert [c.text for c in served] == [r.text for r in local]
        assert [c.prompt_tokens for c in served] == [len(backend.encode(m)) for m in QUESTIONS]
        assert [c.completion_tokens for c in served] == [r.completion_tokens for r in local]

        sampled = OpenAIChatClient(JudgeClientConfig(base_url=f"{base}/v1", model=MODEL_NAME, max_tokens=MAX_TOKENS,
                                                     temperature=0.7, timeout_s=60))
        refused = asyncio.run(ask_all(sampled))
        assert {c.reason for c in refused} == {"http_400"}
        error = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL_NAME, "messages": QUESTIONS[0],
                                                                 "temperature": 0.7}).json()["error"]
        assert "temperature" in error["message"] and error["param"] == "temperature"
        for body in (b"{not json", b'{"model": "tiny-judge"}', b'{"messages": []}'):
            response = httpx.post(f"{base}/v1/chat/completions", content=body,
                                  headers={"Content-Type": "application/json"})
            assert response.status_code == 400 and "message" in response.json()["error"], body
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTIONS[0],
                                                               "max_tokens": 65}).status_code == 400
        too_long = [{"role": "user", "content": "x" * 4096}]
        assert "context" in httpx.post(f"{base}/v1/chat/completions",
                                       json={"messages": too_long}).json()["error"]["message"]
        assert proc.poll() is None  # refusals never take the server down
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_judge_reward_over_a_model_without_score_lines_leaves_rows_unscored(backend):
    n = 2  # a real judge template is ~3,000 characters: 2 prompts of that length already cost seconds on CPU
    batch = RewardBatch(problems=[f"Find x if x + {i} = {i + 3}." for i in range(n)],
                        references=["Subtract: x = 3."] * n, answers=["3"] * n,
                        responses=[f"x = {i}" for i in range(n)], truncated=np.zeros(n, bool), group_size=n)
    calls_before = backend.generate_calls
    result = score_sync(JudgeReward(backend, mode="outcome"), batch)
    assert backend.generate_calls - calls_before < n  # the rows' judge calls shared decodes
    assert not result.valid.any() and np.isnan(result.scores).all()
    assert all(reason.startswith("unparseable:") for reason in result.reasons), result.reasons
    assert result.metrics["reward/unscored_frac"] == 1.0
