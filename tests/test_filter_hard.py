"""The hard-problem filter as a tool: experiments/filter_hard.py samples the base model k times per problem, keeps
the problems it never solves, writes the kept ids with every pass count under a name that digests the inputs (the
weights' sha256 included), reuses that file, and `data.filter_path` applies it (to exactly the records it was
computed on)."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, smoke_config

from exprl_jax.build import load_records
from exprl_jax.data import DataError, write_jsonl
from exprl_jax.data import hard_filter
from exprl_jax.tasks.toy import addition_records

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import filter_hard  # noqa: E402


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny random model as a HF directory: it solves nothing, so every problem is kept."""
    from exprl_jax.models.config import ModelConfig
    from exprl_jax.models.hf import save_hf
    from exprl_jax.models.transformer import init_params
    from exprl_jax.tokenizer import char_tokenizer

    path = str(tmp_path_factory.mktemp("base"))
    config = ModelConfig.tiny(eos_token_id=1, pad_token_id=0, bos_token_id=2)
    save_hf(path, config, jax.device_get(init_params(config, jax.random.key(0))))
    char_tokenizer().save_pretrained(path)
    return path


def config(tmp_path, base_model, **overrides):
    train = str(tmp_path / "train.jsonl")
    if not os.path.exists(train):
        write_jsonl(train, addition_records(6, seed=0))
    return smoke_config(**{"data.source": "jsonl", "data.train_path": train, "model.hf_path": base_model,
                           "model.tokenizer": base_model, "rollout.max_new_tokens": 8, **overrides})


def test_filter_writes_kept_ids_with_pass_counts_and_is_reused(tmp_path, base_model, monkeypatch):
    cfg = config(tmp_path, base_model)
    path, result = filter_hard.filter_hard(cfg, k=2, out_dir=str(tmp_path / "filters"), chunk=4)
    ids = [r.id for r in addition_records(6, seed=0)]
    assert os.path.basename(path).startswith("hard_filter_") and os.path.isfile(path)
    assert result["kept_ids"] == ids and result["pass_counts"] == dict.fromkeys(ids, 0)  # a random model
    assert result["key"]["samples"] == 2 and result["key"]["weights_sha256"] == hard_filter.file_sha256(
        os.path.join(base_model, "model.safetensors"))
    monkeypatch.setattr(hard_filter, "pass_counts", lambda *a, **k: pytest.fail("the result was not reused"))
    assert filter_hard.filter_hard(cfg, k=2, out_dir=str(tmp_path / "filters"))[0] == path
    monkeypatch.setattr(hard_filter, "pass_counts", lambda hf, records, **k: [1, 0, 2, 0, 0, 3])
    path4, result4 = filter_hard.filter_hard(cfg, k=4, out_dir=str(tmp_path / "filters"))  # another k: another file
    assert path4 != path and result4["kept_ids"] == [ids[1], ids[3], ids[4]] and result4["num_kept"] == 3

    filtered = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, filter_path=path4))
    train, _, stats = load_records(filtered)
    assert [r.id for r in train] == result4["kept_ids"]
    assert stats["data/filter_pool"] == 6 and stats["data/filter_kept"] == 3
    assert filter_hard.filter_hard(filtered, k=4, out_dir=str(tmp_path / "filters"))[0] == path4  # unfiltered pool

    write_jsonl(str(tmp_path / "other.jsonl"), addition_records(6, seed=1))
    stale = dataclasses.replace(filtered, data=dataclasses.replace(filtered.data,
                                                                  train_path=str(tmp_path / "other.jsonl")))
    with pytest.raises(DataError, match="computed on other records"):
        load_records(stale)
    with open(path4) as f:
        saved = json.load(f)
    saved["kept_ids"] = []
    with open(path4, "w") as f:
        json.dump(saved, f)
    with pytest.raises(DataError, match="keeps no record"):
        load_records(filtered)


def test_the_filter_needs_weights(tmp_path):
    with pytest.raises(ValueError, match="needs a base model with weights"):
        filter_hard.filter_hard(smoke_config(), k=2, out_dir=str(tmp_path))


@pytest.mark.slow
def test_the_command_line(tmp_path, base_model):
    config(tmp_path, base_model)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "filter_hard.py"),
         f"--config={os.path.join(ROOT, 'experiments/configs/smoke.py')}", "--k=2", f"--out_dir={tmp_path / 'f'}",
         "--config.data.source=jsonl", f"--config.data.train_path={tmp_path / 'train.jsonl'}",
         f"--config.model.hf_path={base_model}", f"--config.model.tokenizer={base_model}",
         "--config.rollout.max_new_tokens=8"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"kept": 6' in out.stdout and "--config.data.filter_path=" in out.stdout


def test_a_checker_failure_is_no_verdict_and_the_problem_is_not_kept(tmp_path, base_model, monkeypatch):
    """Per record, 2 samples: [timeout, wrong] -> None (no verdict: not certified unsolved); [timeout, right] -> 1
    (one success is a verdict); [wrong, wrong] -> 0 (kept)."""
    import numpy as np

    from exprl_jax import rollouts
    from exprl_jax.rewards import answers

    class Sampled:  # what sample_rollouts returns, none truncated
        def __init__(self, part, n):
            self.texts, self.truncated, self._rows = ["x"] * (len(part) * n), np.zeros(len(part) * n, bool), part
            self.n = n

        def row_records(self):
            return [r for r in self._rows for _ in range(self.n)]

    monkeypatch.setattr(rollouts, "sample_rollouts", lambda m, p, t, part, key, rollout_cfg, **k: Sampled(
        part, rollout_cfg.group_size))
    plan = [("timeout", False), ("not_equivalent", False), ("timeout", False), (None, True),
            ("not_equivalent", False), ("not_equivalent", False)]
    monkeypatch.setattr(answers, "check_answers", lambda preds, golds, **k: [
        answers.AnswerCheck(correct=ok, pred="x", reason=reason) for reason, ok in plan])
    records = addition_records(3, seed=0)
    counts = hard_filter.pass_counts(base_model, records, samples=2, temperature=1.0, template="{problem}\n",
                                     max_new_tokens=4, seed=0, answer_style="boxed", chunk=3)
    assert counts == [None, 1, 0]
    result = hard_filter.write_result(str(tmp_path / "r.json"), {"pool": hard_filter.pool_sha256(records)}, records,
                                      counts)
    assert result["kept_ids"] == [records[2].id] and result["no_verdict_ids"] == [records[0].id]
    assert json.loads((tmp_path / "r.json").read_text())["pass_counts"][records[0].id] is None
