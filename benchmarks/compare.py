"""Side-by-side timings against the stacks users would otherwise pick, on one Hugging Face checkpoint:

  python benchmarks/compare.py [--preset bench|qwen3_0_6b_shape|toy | --model-dir DIR] [--rounds 3] [--out F.json]

- train step: our jitted step (PPO clip + dual clip + k3 KL, AdamW, grad clip) vs a PyTorch eager step with the same
  loss on the HF model;
- sampling: `exprl_jax.generate` vs HF `generate` with a static and a dynamic KV cache, on a fixed-length workload
  (no EOS) and a variable-length one (several EOS ids, so lengths spread over 10x); new tokens/s count generated
  tokens only;
- whole RL step: our `Experiment` (method grpo: sample G per prompt, reward, reference log-probs, update) vs TRL's
  `GRPOTrainer` on the same job (B prompts of P tokens, G samples, exactly R new tokens, beta, AdamW lr).

Every side runs in its own process, the sides of a pair alternate (A B A B ...) for `--rounds` rounds, and the
table shows medians over all timed repeats with ours / theirs ratios (> 1: ours faster). `--threads N` pins every
worker to the same N CPUs; each worker's CPU time / wall time is recorded and printed, so the cores each side used
are on record. Meanwhile the CPU time of every other process on the machine and the load average are sampled, and
everything goes to the JSON file.
Needs `pip install -r requirements-bench.txt` (torch, transformers, trl).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Workloads per preset. train: rows x (prompt + response) tokens; sample: prompts x new tokens (fixed: no EOS;
# variable: `var_eos` EOS ids, up to `var_new_tokens`); rl: B prompts of `prompt_len` tokens, G samples each,
# exactly `new_tokens` new tokens. `steps` timed repeats per process after `warmup` untimed ones.
WORKLOADS = {
    "bench": dict(
        train=dict(rows=16, prompt_len=16, response_len=240, kl_coef=0.04, lr=1e-6, warmup=2, steps=6),
        sample=dict(prompts=32, prompt_len=16, new_tokens=128, var_new_tokens=256, var_eos=8, warmup=1, steps=3),
        rl=dict(prompts=4, prompt_len=16, group=8, new_tokens=128, beta=0.04, lr=1e-6, warmup=2, steps=5)),
    "qwen3_0_6b_shape": dict(
        train=dict(rows=4, prompt_len=16, response_len=240, kl_coef=0.04, lr=1e-6, warmup=1, steps=3),
        sample=dict(prompts=8, prompt_len=16, new_tokens=64, var_new_tokens=256, var_eos=3000, warmup=1, steps=2),
        rl=dict(prompts=4, prompt_len=16, group=8, new_tokens=128, beta=0.04, lr=1e-6, warmup=1, steps=2)),
    "toy": dict(
        train=dict(rows=4, prompt_len=16, response_len=16, kl_coef=0.04, lr=1e-6, warmup=1, steps=2),
        sample=dict(prompts=4, prompt_len=16, new_tokens=8, var_new_tokens=16, var_eos=16, warmup=1, steps=2),
        rl=dict(prompts=2, prompt_len=16, group=2, new_tokens=8, beta=0.04, lr=1e-6, warmup=1, steps=2)),
}
WORKLOADS["custom"] = WORKLOADS["bench"]  # --model-dir
PAIRS = {"train": ("jax:train", "torch:train"),
         "sample": ("jax:sample", "torch:sample_static", "torch:sample_dynamic"),
         "rl": ("jax:rl", "torch:rl")}
LABELS = {"jax:train": "exprl_jax", "torch:train": "PyTorch eager", "jax:sample": "exprl_jax",
          "torch:sample_static": "HF generate (static cache)", "torch:sample_dynamic": "HF generate (dynamic cache)",
          "jax:rl": "exprl_jax Experiment", "torch:rl": "TRL GRPOTrainer"}
SPECIAL_IDS = 4  # <pad> <eos> <bos> <unk> of the char tokenizer: never drawn as prompt tokens


# ---------------------------------------------------------------- the inputs both sides share (numpy, seeded)

def train_batch(spec: dict, vocab: int) -> dict[str, np.ndarray]:
    """One update batch: full prompts, right-padded responses of random lengths, old / reference log-probs near
    log(1/V) and per-row advantages, so the ratio, both clips, the dual clip and the KL term are all exercised."""
    rng = np.random.default_rng(0)
    N, P, R = spec["rows"], spec["prompt_len"], spec["response_len"]
    tokens = rng.integers(SPECIAL_IDS, vocab, (N, P + R)).astype(np.int32)
    lengths = rng.integers(R // 2, R + 1, N)
    response_mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    attention = np.concatenate([np.ones((N, P), np.int32), response_mask.astype(np.int32)], axis=1)
    base = -np.log(vocab)
    return {"tokens": tokens, "attention_mask": attention, "response_mask": response_mask,
            "old_logprobs": ((base + rng.normal(0, 0.3, (N, R))) * response_mask).astype(np.float32),
            "ref_logprobs": ((base + rng.normal(0, 0.3, (N, R))) * response_mask).astype(np.float32),
            "advantages": (rng.normal(0, 1, (N, 1)) * response_mask).astype(np.float32)}


def sample_prompts(spec: dict, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    low = SPECIAL_IDS + spec["var_eos"]  # prompts avoid every EOS id of the variable-length workload
    return rng.integers(low, vocab, (spec["prompts"], spec["prompt_len"])).tolist()


def variable_eos_ids(spec: dict) -> list[int]:
    """<eos> and the next var_eos - 1 ids: with near-uniform next-token probabilities the lengths are about
    geometric with mean V / var_eos, which spreads them over more than 10x."""
    return [1] + list(range(SPECIAL_IDS, SPECIAL_IDS + spec["var_eos"] - 1))


def rl_problems(spec: dict, count: int) -> list[str]:
    """`count` distinct problems of prompt_len - 1 characters; the prompt is the problem and a newline."""
    rng = np.random.default_rng(2)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, spec["prompt_len"] - 1)) for _ in range(count)]


def length_stats(lengths) -> dict:
    lengths = np.asarray(lengths)
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"min": int(lengths.min()), "p10": float(p10), "median": float(p50), "p90": float(p90),
            "max": int(lengths.max()), "mean": float(lengths.mean()), "spread_max_over_min": float(
                lengths.max() / max(lengths.min(), 1)), "spread_p90_over_p10": float(p90 / max(p10, 1))}


# ---------------------------------------------------------------- the checkpoint

def preset_config(name: str):
    from exprl_jax.models.config import ModelConfig

    if name == "bench":  # the 4.2M-parameter Qwen3-shaped decoder of the project's earlier measurements
        return ModelConfig.tiny(vocab_size=512, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                                mlp_dim=1024)
    if name == "qwen3_0_6b_shape":
        return ModelConfig.qwen3_0_6b(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if name == "toy":
        return ModelConfig.tiny(vocab_size=128, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=16, mlp_dim=64)
    raise ValueError(f"unknown preset {name!r}")


def tokenizer_of_size(vocab: int):
    """The built-in character tokenizer grown to exactly `vocab` tokens, so every sampled id decodes."""
    from exprl_jax.tokenizer import CHAR_VOCAB, SPECIAL_TOKENS, char_tokenizer

    extra, code = [], 0x100
    while len(SPECIAL_TOKENS) + len(CHAR_VOCAB) + len(extra) < vocab:
        if not 0xD800 <= code <= 0xDFFF:  # surrogates are not characters
            extra.append(chr(code))
        code += 1
    return char_tokenizer(CHAR_VOCAB + "".join(extra))


def build_checkpoint(preset: str, directory: str) -> str:
    """A random-weight HF checkpoint (safetensors, config.json, tokenizer) of `preset` in `directory`."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    import jax

    import exprl_jax as ex

    cfg = preset_config(preset).replace(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    params = ex.init_params(cfg, jax.random.key(0))
    ex.save_hf(directory, cfg, params)
    tokenizer_of_size(cfg.vocab_size).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- who else used the CPU

def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command, CPU seconds so far) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(pid)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    return table


class CpuWatch:
    """Samples /proc every `period` s: CPU seconds used by each process outside this benchmark's process tree,
    and the 1-minute load average."""

    def __init__(self, period: float = 2.0):
        self.period, self.others, self.load = period, {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.time()

    def _ours(self, table) -> set[int]:
        ours, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                ours.add(child)
                frontier.append(child)
        return ours

    def _run(self):
        previous = _proc_table()
        while not self._stop.wait(self.period):
            table = _proc_table()
            ours = self._ours(table)
            for pid, (_, name, cpu) in table.items():
                used = cpu - previous[pid][2] if pid in previous else 0.0
                if pid not in ours and used > 0:
                    key = f"{name} ({pid})"
                    self.others[key] = self.others.get(key, 0.0) + used
            self.load.append(os.getloadavg()[0])
            previous = table

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        wall = time.time() - self._start
        top = sorted(self.others.items(), key=lambda kv: -kv[1])[:12]
        return {"wall_s": wall, "other_cpu_s": sum(self.others.values()),
                "other_cores_mean": sum(self.others.values()) / max(wall, 1e-9),
                "top_other_processes_cpu_s": dict((k, round(v, 1)) for k, v in top),
                "loadavg_1m": {"min": min(self.load, default=float("nan")),
                               "median": float(np.median(self.load)) if self.load else float("nan"),
                               "max": max(self.load, default=float("nan"))}}


# ---------------------------------------------------------------- running the sides

def worker_env(threads: int) -> dict:
    """The workers run on the machine's real devices: emulated-device flags (the test suite's) are dropped.
    threads > 0 caps both stacks' intra-op threads (torch / OpenMP, XLA's CPU Eigen pool; 1 turns it off); the
    cores themselves are capped by `worker_cpus`."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), EXPRL_BENCH_THREADS=str(threads))
        # XLA:CPU has no thread-count flag: one thread = its Eigen pool off (no XLA_FLAGS entry without "--": XLA
        # stops parsing there and silently ignores every flag after it)
        flags.append(f"--xla_cpu_multi_thread_eigen={'false' if threads == 1 else 'true'}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def worker_cpus(threads: int) -> list[int] | None:
    """The CPUs a worker is pinned to: the last `threads` this process may use (the first tends to serve the
    machine's interrupts); None: all. Thread caps alone do not hold XLA:CPU to one core: with its Eigen pool off it
    still runs YNNPACK's dots and independent ops on a pool of one thread per core (1.4 cores on average in a
    decode loop of the 2-core VM). Pinning holds both stacks to the same cores, and each worker's CPU time / wall
    time is recorded to show it."""
    return sorted(os.sched_getaffinity(0))[-threads:] if threads > 0 else None


_PIN_AND_RUN = ("import os, runpy, sys; os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
                "sys.argv = sys.argv[2:]; sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0])); "
                "runpy.run_path(sys.argv[0], run_name='__main__')")  # as `python script.py ...` would run it


def run_side(side: str, model_dir: str, spec: dict, workdir: str, timeout: float, threads: int = 0) -> dict:
    stack, task = side.split(":")
    out = os.path.join(workdir, f"{side.replace(':', '_')}_{time.time_ns()}.json")
    log = out[:-5] + ".log"
    cmd = [sys.executable, os.path.join(HERE, f"compare_{stack}.py"), "--task", task, "--model-dir", model_dir,
           "--spec", json.dumps(spec), "--out", out]
    cpus = worker_cpus(threads)
    if cpus:  # the worker pins itself before it imports anything (a preexec_fn would fork this threaded process)
        cmd = [sys.executable, "-c", _PIN_AND_RUN, ",".join(map(str, cpus))] + cmd[1:]
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=worker_env(threads), timeout=timeout)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not os.path.exists(out):
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{side} failed (exit {proc.returncode}); last output:\n{tail}")
    with open(out) as f:
        result = json.load(f)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["process"] = {"cpus": cpus or "all", "cpu_s": cpu, "wall_s": wall, "cores_used": cpu / wall}
    return result


def cores_used(runs: dict[str, list[dict]], labels: dict[str, str]) -> str:
    """One line: each side's median cores used (its worker processes' CPU time / wall time, start-up included)."""
    used = {labels[s]: float(np.median([r["process"]["cores_used"] for r in rs])) for s, rs in runs.items()
            if rs and "process" in rs[0]}
    return "cores used (CPU time / wall time of each worker process): " + ", ".join(
        f"{k} {v:.2f}" for k, v in used.items())


def speed(side: str, result: dict, workload: str) -> list[float]:
    """Per-repeat speed, higher is better: tokens/s (train, sampling) or steps/s (RL)."""
    if side.endswith(":rl"):
        return [1.0 / t for t in result["step_s"]]
    if side.endswith(":train"):
        return [result["tokens"] / t for t in result["step_s"]]
    w = result[workload]
    return [n / t for n, t in zip(w["new_tokens"], w["seconds"])]


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for pair, sides in PAIRS.items():
        present = [s for s in sides if runs.get(s)]
        if not present:
            continue
        workloads = ("fixed", "variable") if pair == "sample" else ("step",)
        for workload in workloads:
            med = {s: float(np.median([v for r in runs[s] for v in speed(s, r, workload)])) for s in present}
            ours = med.get(sides[0])
            for s in present[1:]:
                rows.append({"pair": pair, "workload": workload, "ours": LABELS[sides[0]], "reference": LABELS[s],
                             "ours_speed": ours, "reference_speed": med[s],
                             "ratio": ours / med[s] if ours else float("nan")})
    return rows


def train_mfu(runs: dict[str, list[dict]], peak_tflops: float) -> dict[str, float]:
    """Model FLOPs utilisation of each train step: 6 x parameters FLOPs per token (forward + backward; attention
    scores left out, as usual) at the median tokens/s, over the accelerator's peak dense fp32 TFLOP/s."""
    out = {}
    for side in PAIRS["train"]:
        if runs.get(side) and peak_tflops > 0:
            tok_s = float(np.median([v for r in runs[side] for v in speed(side, r, "step")]))
            out[LABELS[side]] = 6 * runs[side][0]["params"] * tok_s / (peak_tflops * 1e12)
    return out


RL_PARTS = {"jax:rl": {"sample": "time/sample_s", "reward": "time/reward_s",
                       "reference": "time/device_while_judging_s", "update": "time/update_s"},
            "torch:rl": {"generate": "generate", "reward + reference": "reward_and_reference", "update": "update"}}


def rl_parts(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Where each side's RL step goes: per part, the median over processes of each process's median seconds."""
    out = {}
    for side, keys in RL_PARTS.items():
        results = [r for r in runs.get(side, []) if "breakdown_median_s" in r]
        if results:
            out[LABELS[side]] = {part: float(np.median([r["breakdown_median_s"][key] for r in results]))
                                 for part, key in keys.items()}
    return out


def format_rl_parts(parts: dict[str, dict[str, float]]) -> str:
    return "RL step parts (s, medians): " + "; ".join(
        f"{side} " + ", ".join(f"{part} {sec:.2f}" for part, sec in p.items()) for side, p in parts.items())


def format_table(rows: list[dict], workloads: dict) -> str:
    w = workloads
    train_len = w["train"]["prompt_len"] + w["train"]["response_len"]
    what = {("train", "step"): f"train step, {w['train']['rows']}x{train_len} tokens (tok/s)",
            ("sample", "fixed"): f"sampling, {w['sample']['prompts']} x {w['sample']['new_tokens']} new (new tok/s)",
            ("sample", "variable"): f"sampling, {w['sample']['prompts']} x <={w['sample']['var_new_tokens']} new, "
                                    f"{w['sample']['var_eos']} EOS ids (new tok/s)",
            ("rl", "step"): f"RL step, {w['rl']['prompts']}x{w['rl']['group']} x {w['rl']['new_tokens']} new "
                            "(s/step)"}
    lines = [f"| {'workload':<58} | {'exprl_jax':>10} | {'reference':<28} | {'theirs':>10} | {'ratio':>6} |",
             f"|{'-' * 60}|{'-' * 12}|{'-' * 30}|{'-' * 12}|{'-' * 8}|"]
    for r in rows:
        rl = r["pair"] == "rl"
        ours = f"{1 / r['ours_speed']:.3f}" if rl else f"{r['ours_speed']:,.0f}"
        theirs = f"{1 / r['reference_speed']:.3f}" if rl else f"{r['reference_speed']:,.0f}"
        lines.append(f"| {what[(r['pair'], r['workload'])]:<58} | {ours:>10} | {r['reference']:<28} | "
                     f"{theirs:>10} | {r['ratio']:>5.2f}x |")
    return "\n".join(lines)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="bench", choices=[k for k in WORKLOADS if k != "custom"])
    source.add_argument("--model-dir", help="a Hugging Face model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--pairs", default="train,sample,rl", help="comma-separated subset of train,sample,rl")
    parser.add_argument("--rounds", type=int, default=3, help="A B A B ... rounds per pair")
    parser.add_argument("--workdir", help="where the checkpoint and the workers' logs go (default: a temp dir)")
    parser.add_argument("--out", default="compare.json")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    parser.add_argument("--threads", type=int, default=0,
                        help="cores and intra-op threads of both stacks: each worker is pinned to the last N CPUs "
                             "(0: each stack's default, all cores). On a shared, busy machine 1 is steadier: a "
                             "starved second OpenMP thread stalls torch")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's peak dense fp32 TFLOP/s: adds the train step's MFU to the report")
    args = parser.parse_args(argv)
    pairs = [p for p in args.pairs.split(",") if p]
    if unknown := set(pairs) - set(PAIRS):
        parser.error(f"unknown pair(s) {sorted(unknown)}; expected some of {list(PAIRS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="exprl_compare_")
    os.makedirs(workdir, exist_ok=True)
    preset = "custom" if args.model_dir else args.preset
    model_dir = args.model_dir or build_checkpoint(args.preset, os.path.join(workdir, f"hf_{args.preset}"))
    workloads = WORKLOADS[preset]
    runs: dict[str, list[dict]] = {}
    with CpuWatch() as watch:
        for pair in pairs:
            for round_ in range(args.rounds):
                for side in PAIRS[pair]:
                    t = time.time()
                    result = run_side(side, model_dir, workloads[pair], workdir, args.timeout, args.threads)
                    runs.setdefault(side, []).append(result)
                    print(f"[{pair} round {round_ + 1}/{args.rounds}] {LABELS[side]}: done in "
                          f"{time.time() - t:.0f}s", flush=True)
    rows = summarise(runs)
    table = format_table(rows, workloads)
    mfu = train_mfu(runs, args.peak_tflops)
    table += "\n" + cores_used(runs, LABELS)
    parts = rl_parts(runs)
    if parts:
        table += "\n" + format_rl_parts(parts)
    if mfu:
        table += "\ntrain step MFU (6 x params FLOPs per token): " + ", ".join(
            f"{k} {v:.1%}" for k, v in mfu.items())
    report = {"preset": preset, "model_dir": model_dir, "workloads": workloads, "rounds": args.rounds,
              "threads": args.threads or "default",
              "table": rows, "table_text": table, "train_mfu": mfu, "rl_parts": parts, "runs": runs,
              "cpu_during_run": watch.report(),
              "machine": machine(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    load = report["cpu_during_run"]
    print(table)
    print(f"load average (1 min) during the run: {load['loadavg_1m']}; other processes used "
          f"{load['other_cores_mean']:.2f} cores on average; top: "
          f"{dict(list(load['top_other_processes_cpu_s'].items())[:5])}")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
