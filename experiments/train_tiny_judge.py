"""python experiments/train_tiny_judge.py --out=assets/tiny_judge [--steps=200]

Makes the tiny judge that the CPU runs of the real-data configs serve with `python -m exprl_jax.serve`: the tiny
character-level model, taught by SFT to answer the real `outcome` judge request in the rubric's format
(`Reasoning: ...` then `Score: N`). Its tokenizer's chat template keeps only the last characters of the fenced
trace (a 0.1M-parameter model cannot read a 4,000-character rubric). Its targets: the reference as the trace
scores 5, an empty trace 1, any other trace 4 when its last character is not a letter and 2 when it is. After 200
steps it follows the first two and answers 2 or 4 about at random on other traces (assets/tiny_judge/README.md).
It cannot grade; it exists so that a CPU run proves the path end to end (the judge is called over HTTP, its answer
parsed, its varying rewards used). Real runs serve a real model instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exprl_jax.data import QARecord, write_jsonl  # noqa: E402

CONTEXT = 8192  # the saved model's max_position_embeddings (RoPE has no learned positions)
TRACE_CHARS = 96  # how much of the trace's end the chat template keeps
# The whole request reaches the server; the template reduces it to the trace's last characters.
CHAT_TEMPLATE = (
    "{%- set user = messages[-1]['content'] -%}"
    "{%- set block = user.split('## Generated reasoning')[-1].split('## Reference solution')[0] -%}"
    "{%- set body = block.split('>>\n', 1)[-1].rsplit('\n<<END-', 1)[0] -%}"
    "{{ 'trace: ' + body[-" + str(TRACE_CHARS) + ":] }}\nverdict:\n")


def rule_score(trace: str, reference: str) -> int:
    """The targets the tiny judge is taught (see the module docstring)."""
    if trace == reference:
        return 5
    if not trace:
        return 1
    return 2 if trace[-1] in string.ascii_letters else 4


def answer_text(score: int) -> str:
    return f"Reasoning: rule {score}.\nScore: {score}"


def judge_records(records, tokenizer, seed: int = 0, noise_per_problem: int = 8) -> list[QARecord]:
    """(judge prompt -> answer) records: per problem the reference, `noise_per_problem` random traces and an empty
    one, each rendered with the `outcome` template and then the judge tokenizer's chat template."""
    from exprl_jax.judge.templates import load_template
    from exprl_jax.judge.templates import prompt_messages_text
    from exprl_jax.tokenizer import CHAR_VOCAB

    template, rng = load_template("outcome"), np.random.default_rng(seed)
    out = []
    for r in records:
        noises = ["".join(rng.choice(list(CHAR_VOCAB), size=int(rng.integers(1, 40))))
                  for _ in range(noise_per_problem)]
        for k, trace in enumerate([r.reference, ""] + noises):
            messages = template.render(problem=r.problem, reference=r.reference, trace=trace)
            score = rule_score(trace, r.reference)
            out.append(QARecord(id=f"{r.id}/{k}", problem=prompt_messages_text(tokenizer, messages),
                                reference=answer_text(score), answer=str(score)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the HF directory to write (e.g. assets/tiny_judge)")
    parser.add_argument("--workdir", default="/tmp/tiny_judge_sft")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--problems", type=int, default=512)
    args = parser.parse_args(argv)

    from exprl_jax.config import load_config
    from exprl_jax.data.sources import load_dataset
    from exprl_jax.experiment import Experiment
    from exprl_jax.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    problems = load_dataset("gsm8k")["train"][:args.problems]
    records = judge_records(problems, tokenizer)
    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, "judge_sft.jsonl")
    write_jsonl(data_path, records)
    seq_len = max(len(tokenizer.encode(r.problem + r.reference, add_special_tokens=False)) for r in records) + 1
    seq_len = -(-seq_len // 64) * 64
    print(f"{len(records)} judge examples, seq_len {seq_len}", flush=True)
    smoke = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "smoke.py")
    cfg = load_config(smoke, **{
        "name": "tiny_judge", "method": "sft", "data.source": "jsonl", "data.train_path": data_path,
        "data.prompt_template": "{problem}", "data.num_eval": 0, "train.steps": args.steps,
        "train.batch_size": 32, "train.seq_len": seq_len, "train.save_every": 50, "optim.learning_rate": 3e-3, "optim.warmup_steps": 20,
        "eval.at_start": False, "eval.at_end": False})
    Experiment(cfg, os.path.join(args.workdir, "run")).run()
    final = os.path.join(args.workdir, "run", "final_hf")
    os.makedirs(args.out, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(final, name), os.path.join(args.out, name))
    tokenizer.save_pretrained(args.out)
    config_path = os.path.join(args.out, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["max_position_embeddings"] = CONTEXT
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
