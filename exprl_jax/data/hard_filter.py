"""The hard-problem filter (SPEC §2: train on problems the base model fails in all k samples): the base model's
pass counts, the result file (kept ids with every pass count, named by a digest of everything that determines it,
the weights' sha256 included, so it is computed once per base model), and applying a result to a record set.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Sequence

import numpy as np

from exprl_jax.data.records import DataError, QARecord


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(hf_dir: str) -> str:
    """One digest of a HF directory's weight files (model.safetensors, or every shard)."""
    names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights")
    if names == ["model.safetensors"]:
        return file_sha256(os.path.join(hf_dir, names[0]))
    return hashlib.sha256("".join(f"{n}:{file_sha256(os.path.join(hf_dir, n))}\n" for n in names).encode()).hexdigest()


def pool_sha256(records: Sequence[QARecord]) -> str:
    """Digest of the records a filter was computed on (ids and problems, in order)."""
    return hashlib.sha256("\n".join(r.id + "|" + r.problem for r in records).encode()).hexdigest()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def pass_counts(hf_dir: str, records: Sequence[QARecord], *, samples: int, temperature: float, template: str,
                max_new_tokens: int, seed: int, answer_style: str, chunk: int = 64, chat: bool = False,
                mesh=None) -> list[int | None]:
    """Per record, how many of `samples` base-model samples (temperature, prompt template) end in a correct final
    answer; a truncated sample counts as wrong. None: no sample was right and the checker failed (timeout, worker
    error) on at least one, so the record has no verdict; a filter must not keep it as unsolved. Chunk c uses the
    key fold_in(key(seed), c·chunk)."""
    import jax

    from exprl_jax.config import RolloutSection
    from exprl_jax.metrics import report_progress
    from exprl_jax.models.hf import load_hf
    from exprl_jax.rewards.answers import check_answers, extract_answer
    from exprl_jax.rollouts import sample_rollouts
    from exprl_jax.tokenizer import eos_ids, load_tokenizer, pad_id

    model_cfg, params = load_hf(hf_dir, mesh=mesh)
    tokenizer = load_tokenizer(hf_dir)
    sampling = RolloutSection(group_size=samples, temperature=temperature, max_new_tokens=max_new_tokens)
    rng, counts, t0 = jax.random.key(seed), [], time.time()
    for start in range(0, len(records), chunk):
        part = list(records[start:start + chunk])
        r = sample_rollouts(model_cfg, params, tokenizer, part, jax.random.fold_in(rng, start), rollout_cfg=sampling,
                            template=template, eos=eos_ids(tokenizer), pad=pad_id(tokenizer), mesh=mesh, chat=chat)
        checks = check_answers([extract_answer(x, style=answer_style) for x in r.texts],
                               [x.answer for x in r.row_records()])
        ok = (np.array([c.correct for c in checks]) & ~r.truncated).reshape(len(part), samples)
        failed = np.array([c.checker_failed for c in checks]).reshape(len(part), samples)
        counts += [None if (n == 0 and f) else n for n, f in zip(ok.sum(axis=1).tolist(), failed.any(axis=1))]
        report_progress("hard filter", start + len(part), len(records), "problems sampled", t0)
    return counts


def write_result(path: str, key: dict, records: Sequence[QARecord], counts: Sequence[int | None]) -> dict:
    """Writes the result atomically: the key, the kept ids (pass count 0), every record's pass count (null: no
    verdict) and the ids without a verdict, which are not kept."""
    if len(records) != len(counts):
        raise ValueError(f"{len(records)} records but {len(counts)} pass counts")
    result = {"key": key, "num_records": len(records), "kept_ids": [r.id for r, c in zip(records, counts) if c == 0],
              "pass_counts": {r.id: None if c is None else int(c) for r, c in zip(records, counts)},
              "no_verdict_ids": [r.id for r, c in zip(records, counts) if c is None]}
    result["num_kept"] = len(result["kept_ids"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result


def read_result(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    for field, kind in (("key", dict), ("kept_ids", list), ("pass_counts", dict)):
        if not isinstance(result.get(field), kind):
            raise DataError(f"{path}: field '{field}': missing or not a {kind.__name__} (not a filter_hard.py result)")
    return result


def apply_filter(records: Sequence[QARecord], path: str):
    """The records a result kept, in their order (a mixture stays a mixture). The result must have been computed
    on exactly these records (same ids and problems); anything else, or keeping nothing, is an error naming the
    file."""
    result = read_result(path)
    computed_on = result["key"].get("pool")
    if computed_on != pool_sha256(records):
        raise DataError(f"{path}: this filter was computed on other records (pool digest {computed_on!r}); "
                        "re-run experiments/filter_hard.py with this config")
    kept = set(result["kept_ids"])
    if not kept:
        raise DataError(f"{path}: the filter keeps no record")
    if hasattr(records, "subset"):
        return records.subset(lambda _, r: r.id in kept)
    return [r for r in records if r.id in kept]
