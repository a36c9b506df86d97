"""Prints the judge client's requests/second against a local OpenAI-compatible server (a server process on this
machine, no faults), and the share of judge latency hidden behind device work with `judge.overlap` on and off.

  python benchmarks/judge.py [--requests 2000] [--judge-delay 0.3] [--steps 4]
"""
import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from exprl_jax.judge.client import JudgeClientConfig, OpenAIChatClient  # noqa: E402

_SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from judge_fault_server import FaultServer
server = FaultServer(fault_rate=0.0, delay_s={delay})
print(server.start(), flush=True)
time.sleep(3600)
"""


def start_server(delay: float = 0.0):
    proc = subprocess.Popen([sys.executable, "-c", _SERVER.format(tests=os.path.join(ROOT, "tests"), delay=delay)],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def client_throughput(url: str, n: int) -> float:
    client = OpenAIChatClient(JudgeClientConfig(base_url=url, model="bench", max_concurrency=64))
    messages = [{"role": "system", "content": "rubric " * 200},
                {"role": "user", "content": "problem trace reference " * 300}]  # ~9 KB, a judge-sized request

    async def many():
        t = time.monotonic()
        results = await asyncio.gather(*(client.complete(messages) for _ in range(n)))
        await client.aclose()
        assert all(r.text is not None for r in results)
        return n / (time.monotonic() - t)

    asyncio.run(many())  # warm up connections
    return max(asyncio.run(many()) for _ in range(3))


SMOKE = os.path.join(ROOT, "experiments", "configs", "smoke.py")


def sft_base(workdir: str) -> str:
    """A tiny model taught the toy format by SFT, so its rollouts end with EOS and reach the judge (a random
    model's are all truncated, and truncated rollouts get 0 without a judge call)."""
    from exprl_jax.config import load_config
    from exprl_jax.experiment import Experiment

    Experiment(load_config(SMOKE, **{"method": "sft", "train.steps": 150, "optim.learning_rate": 3e-3,
                                     "eval.at_start": False, "eval.at_end": False}), workdir).run()
    return workdir


def hidden_fraction(url: str, overlap: bool, steps: int, base: str) -> tuple[float, float, float]:
    from exprl_jax.config import load_config
    from exprl_jax.experiment import Experiment
    from exprl_jax.metrics import read_metrics

    cfg = load_config(SMOKE, **{"train.steps": steps, "eval.at_start": False, "eval.at_end": False,
                                "model.init_checkpoint": base, "judge.backend": "openai", "judge.base_url": url,
                                "judge.model": "slow", "judge.overlap": overlap, "judge.cache": False})
    with tempfile.TemporaryDirectory() as workdir:
        Experiment(cfg, workdir).run()
        rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss/total" in r][1:-1]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return mean("time/judge_hidden_frac"), mean("time/step_s"), mean("time/reward_s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--judge-delay", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    proc, url = start_server()
    try:
        print(f"client, 64 concurrent, fault-free local server: {client_throughput(url, args.requests):.0f} req/s")
    finally:
        proc.kill()
    proc, url = start_server(args.judge_delay)
    base_dir = tempfile.TemporaryDirectory()
    try:
        base = sft_base(base_dir.name)
        for overlap in (False, True):
            frac, step_s, judge_s = hidden_fraction(url, overlap, args.steps, base)
            print(f"judge delay {args.judge_delay}s, overlap={overlap}: judge_hidden_frac={frac:.2f}, "
                  f"judge {judge_s:.2f}s/step, step {step_s:.2f}s (mean of steps 2..{args.steps - 1})")
    finally:
        proc.kill()
        base_dir.cleanup()


if __name__ == "__main__":
    main()
