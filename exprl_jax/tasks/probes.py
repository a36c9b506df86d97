"""Measurements of a testbed base model, for its README, the Stage-I pool choice and the judge's validity check:
sample accuracy per chain length k, late-step accuracy given a correct prefix, the chance to finish correctly from
a prefix at each outcome level, the self-distillation teacher's pass@16 lift, and the student's initial reverse KL.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from exprl_jax.config import RolloutSection
from exprl_jax.data import QARecord
from exprl_jax.judge.programmatic import checkpoints_of, outcome_level, verify
from exprl_jax.rewards.answers import extract_answer
from exprl_jax.tasks import testbed as tb

MAX_ROWS = 256  # sampled rows per generate call (the teacher prompts are long: KV-cache memory)


@dataclasses.dataclass(frozen=True)
class Base:
    model_cfg: object
    params: object
    tokenizer: object

    @classmethod
    def load(cls, path: str) -> "Base":
        from exprl_jax.models.hf import load_hf
        from exprl_jax.tokenizer import load_tokenizer

        hf = tb.resolve_base(path)[1]
        model_cfg, params = load_hf(hf)
        return cls(model_cfg, params, load_tokenizer(hf))

    def sample(self, records, key, n: int, max_new_tokens: int, template: str = "{problem}\n",
               temperature: float = 0.8):
        """n samples per record: (texts [len(records) * n], truncated), record-major."""
        from exprl_jax.rollouts import sample_rollouts
        from exprl_jax.tokenizer import eos_ids, pad_id

        cfg = RolloutSection(group_size=n, temperature=temperature, max_new_tokens=max_new_tokens)
        texts, cut, step = [], [], max(1, MAX_ROWS // n)
        for start in range(0, len(records), step):
            r = sample_rollouts(self.model_cfg, self.params, self.tokenizer, records[start:start + step],
                                jax.random.fold_in(key, start), rollout_cfg=cfg, template=template,
                                eos=eos_ids(self.tokenizer), pad=pad_id(self.tokenizer))
            texts += r.texts
            cut += r.truncated.tolist()
        return texts, np.array(cut, dtype=bool)


def _records(k: int, n: int, split: str = "ladder") -> list[tuple[tb.Item, QARecord]]:
    return [(item, tb._record(split, i, item, tb.reference_solution(item))) for i, item in tb._items(split, [k], n)]


def _cps(rec: QARecord):
    return checkpoints_of("\n".join(rec.checkpoints))


def sample_accuracy(base: Base, k: int, problems: int, n: int, key, teacher: bool = False, pairs=None) -> dict:
    """Answer pass@1 / pass@n (share of problems with a success), exact-trace pass@1, steps written and the share
    of single-segment responses, from n samples of `problems` held-out chains (or of the given (item, record)
    `pairs`); `teacher`: the prompt holds the reference (the self-distillation teacher's view)."""
    pairs = _records(k, problems) if pairs is None else pairs[:problems]
    problems = len(pairs)
    records = [dataclasses.replace(rec, problem=tb.teacher_problem(item)) if teacher else rec for item, rec in pairs]
    texts, cut = base.sample(records, key, n, tb.max_new_tokens([k]))
    rows = [rec for _, rec in pairs for _ in range(n)]
    verdicts = [verify(t, _cps(rec), rec.answer) for t, rec in zip(texts, rows)]
    ok = np.array([v.answer_ok for v in verdicts]) & ~cut
    exact = np.array([v.complete for v in verdicts]) & ~cut
    per_problem = ok.reshape(problems, n)
    return {"k": k, "problems": problems, "samples": n, "pass@1": float(ok.mean()),
            f"pass@{n}": float(per_problem.any(axis=1).mean()), "exact_pass@1": float(exact.mean()),
            "steps_written": float(np.mean([t.count("###") for t in texts])),
            "single_segment_frac": float(np.mean([len([p for p in t.split("###") if p.strip()]) == 1
                                                  for t in texts]))}


def _continue(base: Base, prefixes: list[tuple[QARecord, str]], key, n: int, max_new_tokens: int):
    """n continuations of each (record, prefix): texts prefix + continuation and truncation flags."""
    records = [dataclasses.replace(rec, problem=f"{rec.problem}\n{prefix}") for rec, prefix in prefixes]
    texts, cut = base.sample(records, key, n, max_new_tokens, template="{problem}")
    return [prefixes[i // n][1] + t for i, t in enumerate(texts)], cut


def late_step_accuracy(base: Base, k: int, problems: int, n: int, key, pairs=None) -> dict:
    """Given the first k-1 steps of the native trace, how often the base writes step k right and finishes with
    the right answer: the reliability of its last look-up, which no amount of earlier progress replaces. On the
    first `problems` pool chains of length k, or on the given (item, record) `pairs`."""
    pairs = _records(k, problems, split="pool") if pairs is None else pairs[:problems]
    prefixes = [(rec, "###".join(tb.native_trace(item).split("###")[:k - 1]) + "###") for item, rec in pairs]
    texts, cut = _continue(base, prefixes, key, n, 64)
    rows = [rec for rec, _ in prefixes for _ in range(n)]
    verdicts = [verify(t, _cps(rec), rec.answer) for t, rec in zip(texts, rows)]
    return {"k": k, "step": float(np.mean([v.progress >= k for v in verdicts])),
            "answer": float(np.mean(np.array([v.answer_ok for v in verdicts]) & ~cut))}


def prefix_validity(base: Base, k: int, problems: int, samples: int, continuations: int, key) -> dict:
    """The judge's validity check (after the paper's judge appendix): cut base samples after every step, grade
    each prefix with the outcome rubric (levels 1-3: a prefix has no answer yet), continue it `continuations`
    times from the base, and return {level: {"prefixes", "finish"}}: the share of continuations that end with the
    right answer. A valid judge's level predicts the chance to finish: it rises with the level."""
    pairs = _records(k, problems, split="pool")
    texts, _ = base.sample([rec for _, rec in pairs], jax.random.fold_in(key, 0), samples, tb.max_new_tokens([k]))
    prefixes, levels = [], []
    for i, text in enumerate(texts):
        rec = pairs[i // samples][1]
        cuts = [0] + [m + 3 for m in range(len(text)) if text.startswith("###", m)]
        for end in cuts:
            prefix = text[:end]
            if extract_answer(prefix, style="boxed") is None:
                prefixes.append((rec, prefix))
                levels.append(outcome_level(verify(prefix, _cps(rec), rec.answer)))
    full, cut = _continue(base, prefixes, jax.random.fold_in(key, 1), continuations, tb.max_new_tokens([k]))
    rows = [rec for rec, _ in prefixes for _ in range(continuations)]
    finish = np.array([extract_answer(t, style="boxed") == rec.answer for t, rec in zip(full, rows)]) & ~cut
    finish_P = finish.reshape(len(prefixes), continuations).mean(axis=1)
    levels = np.array(levels)
    return {int(level): {"prefixes": int((levels == level).sum()), "finish": float(finish_P[levels == level].mean())}
            for level in sorted(set(levels.tolist()))}


def reverse_kl(base: Base, k: int, problems: int, n: int, key, temperature: float = 0.8) -> dict:
    """The self-distillation student's initial per-token reverse KL to its teacher (SPEC §6) on the Stage-I
    difficulty: student samples from the bare prompt, scored by the same weights with the reference in the prompt;
    per problem the mean over sampled tokens of log pi_student - log pi_teacher (T-scaled as in training).
    Returns the mean and the median / quartiles over problems (the paper's median 0.05, IQR 0.034-0.068)."""
    from exprl_jax.judge.templates import load_template, prompt_messages_text
    from exprl_jax.rollouts import sample_rollouts, score_responses, sequence_batch
    from exprl_jax.sampling import pad_prompts
    from exprl_jax.tokenizer import eos_ids, pad_id

    pairs = _records(k, problems, split="pool")
    records = [rec for _, rec in pairs]
    r = sample_rollouts(base.model_cfg, base.params, base.tokenizer, records, key,
                        rollout_cfg=RolloutSection(group_size=n, temperature=temperature,
                                                   max_new_tokens=tb.max_new_tokens([k])),
                        template="{problem}\n", eos=eos_ids(base.tokenizer), pad=pad_id(base.tokenizer))
    student = score_responses(base.model_cfg, base.params, sequence_batch(r.prompt_tokens, r.prompt_mask, r.tokens,
                                                                          r.response_mask), temperature, chunk=256)
    template = load_template("self-distill-teacher")
    teacher_prompts = [base.tokenizer.encode(prompt_messages_text(base.tokenizer, template.render(
        problem=rec.problem, reference=rec.reference)), add_special_tokens=False) for rec in records]
    t_tokens, t_mask = pad_prompts(teacher_prompts, pad_id(base.tokenizer))
    teacher = score_responses(base.model_cfg, base.params, sequence_batch(
        np.repeat(t_tokens, n, 0), np.repeat(t_mask, n, 0), r.tokens, r.response_mask), temperature, chunk=256)
    mask = r.response_mask
    per_row = ((student - teacher) * mask).sum(axis=1)
    per_problem = per_row.reshape(problems, n).sum(axis=1) / mask.reshape(problems, n, -1).sum(axis=(1, 2))
    q25, median, q75 = np.quantile(per_problem, [0.25, 0.5, 0.75])
    return {"k": k, "mean": float(((student - teacher) * mask).sum() / mask.sum()), "median": float(median),
            "q25": float(q25), "q75": float(q75)}


LATE_BAND = (0.15, 0.40)  # late-step accuracy given a correct prefix: something to reinforce, far from solved
MAX_POOL_ACCURACY = 0.01


def pool_candidates(late: dict[int, dict], band=LATE_BAND) -> list[int]:
    """Chain lengths whose late-step accuracy given a correct prefix lies in `band`, shortest first."""
    return [k for k in sorted(late) if band[0] <= late[k]["step"] <= band[1]]


def choose_pool(late: dict[int, dict], pool_accuracy: dict[int, float], band=LATE_BAND,
                max_acc: float = MAX_POOL_ACCURACY):
    """The Stage-I pool's chain length: the shortest k whose late-step accuracy given a correct prefix lies in
    `band` and whose filtered pool (the problems the base failed in all filter samples) the base solves in at most
    `max_acc` of fresh samples (None when no k qualifies)."""
    ok = [k for k in pool_candidates(late, band) if k in pool_accuracy and pool_accuracy[k] <= max_acc]
    return ok[0] if ok else None


def filtered_pool(config_path: str, k: int, **overrides) -> list[tuple[tb.Item, QARecord]]:
    """The Stage-I pool of `config_path` with chain length k after its base-model filter (computed and cached next
    to the base, where the experiment finds it), as (item, record) pairs."""
    from exprl_jax.config import load_config

    cfg = load_config(config_path, **{"testbed.stage1_steps": (k,), **overrides})
    kept = {r.id for r in tb.testbed_records(cfg)[0]}
    t = cfg.testbed
    return [(item, rec) for item, rec in _records(k, t.num_pool, split="pool") if rec.id in kept]


def read_json(path: str):
    import json

    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def calibration_items(base: Base, ks, problems: int, samples: int, key) -> list:
    """Judge-calibration items (SPEC §7) from the base's own samples of held-out chains: the trace, its known
    correctness (the answer check) and the problem's reference; both classes occur when ks span easy and hard."""
    from exprl_jax.judge.calibration import CalibrationItem

    items = []
    for k in ks:
        pairs = _records(k, problems, split="same")
        texts, cut = base.sample([rec for _, rec in pairs], jax.random.fold_in(key, k), samples, tb.max_new_tokens([k]))
        for i, (text, truncated) in enumerate(zip(texts, cut)):
            rec = pairs[i // samples][1]
            items.append(CalibrationItem(
                id=f"{rec.id}/s{i % samples}", subset=f"k{k}", problem=rec.problem, trace=text,
                correct=bool(extract_answer(text, style="boxed") == rec.answer and not truncated),
                reference=rec.reference, answer=rec.answer, reference_id=rec.id))
    return items
