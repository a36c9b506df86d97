"""Run storage through etils.epath: append logs on local disks and on an object store (an in-memory gs:// that,
like GCS, cannot append), and a whole run whose workdir is gs://: every file lands in the store, none on disk."""
import importlib
import json
import os

import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from conftest import random_params, smoke_config
from exprl_jax import storage
from exprl_jax.models.config import ModelConfig


class FakeGCS(MemoryFileSystem):
    """gs:// and gcs:// in memory; like GCS it cannot append. One class for the session: epath caches the
    filesystem instance per protocol."""
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return "/" + path.strip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("object stores cannot append")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is a read-only view)
    for protocol in ("gs", "gcs"):  # restored afterwards
        monkeypatch.setitem(registry, protocol, FakeGCS)
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    yield FakeGCS.store
    FakeGCS.store.clear()


def test_local_append_log_appends_reads_and_rewrites(tmp_path):
    log = storage.AppendLog(tmp_path / "sub" / "x.jsonl")
    assert not log.exists() and log.read() == b""
    log.append(b"a\n")
    log.append(b"b\n")
    assert (tmp_path / "sub" / "x.jsonl").read_bytes() == b"a\nb\n"  # flushed at once, one file
    log.rewrite(b"a\n")
    log.append(b"c\n")
    log.close()
    assert storage.AppendLog(tmp_path / "sub" / "x.jsonl").read() == b"a\nc\n"
    assert os.listdir(tmp_path / "sub") == ["x.jsonl"]


def test_object_store_append_log_writes_parts_and_compacts(fake_gcs):
    log = storage.AppendLog("gs://bucket/run/x.jsonl", max_parts=2)
    for line in (b"1\n", b"2\n"):
        log.append(line)
    assert sorted(fake_gcs) == ["/bucket/run/x.jsonl.part-000001", "/bucket/run/x.jsonl.part-000002"]
    assert storage.AppendLog("gs://bucket/run/x.jsonl").read() == b"1\n2\n"
    log.append(b"3\n")  # a third part: compacted into a base that holds everything through it
    assert sorted(fake_gcs) == ["/bucket/run/x.jsonl.base-000004"] and log.read() == b"1\n2\n3\n"
    log.append(b"4\n")
    assert log.read() == b"1\n2\n3\n4\n"
    log.rewrite(b"1\n")
    assert sorted(fake_gcs) == ["/bucket/run/x.jsonl.base-000006"] and log.read() == b"1\n"


def test_object_store_log_survives_a_crash_inside_a_compaction(fake_gcs):
    """A new base is written before what it replaces is deleted: objects left over by a crash in between are
    ignored, so no line is read twice."""
    log = storage.AppendLog("gs://bucket/x.jsonl")
    log.append(b"1\n")
    log.append(b"2\n")
    # crashed after writing the base that replaces parts 1 and 2, before deleting them
    storage.as_path("gs://bucket/x.jsonl.base-000003").write_bytes(b"1\n2\n")
    assert storage.AppendLog("gs://bucket/x.jsonl").read() == b"1\n2\n"
    log.append(b"3\n")
    assert storage.AppendLog("gs://bucket/x.jsonl").read() == b"1\n2\n3\n"


def test_object_store_appends_are_buffered_until_flush(fake_gcs):
    log = storage.AppendLog("gs://bucket/x.jsonl", buffer_s=3600)
    log.append(b"1\n")
    log.append(b"2\n")
    assert not fake_gcs  # nothing uploaded within the buffering window
    log.close()
    assert storage.AppendLog("gs://bucket/x.jsonl").read() == b"1\n2\n" and len(fake_gcs) == 1


def test_judge_cache_metrics_and_rollouts_on_an_object_store(fake_gcs):
    from exprl_jax.judge.cache import JudgeCache
    from exprl_jax.metrics import MetricsLogger, read_metrics, truncate_metrics
    from exprl_jax.rollouts import Rollouts, load_rollouts, save_rollouts
    from exprl_jax.tasks.toy import addition_records
    from exprl_jax.tokenizer import char_tokenizer

    with JudgeCache("gs://bucket/run/judge_cache") as cache:
        cache.put("k1", "Score: 4")
    with JudgeCache("gs://bucket/run/judge_cache") as cache:
        assert cache.get("k1") == "Score: 4"

    logger = MetricsLogger("gs://bucket/run")
    for step in range(3):
        logger.log(step, {"loss/total": 0.5 * step}, console=False)
    logger.close()
    truncate_metrics("gs://bucket/run/metrics.jsonl", 1)
    assert [r["step"] for r in read_metrics("gs://bucket/run/metrics.jsonl")] == [0, 1]
    assert any(k.startswith("/bucket/run/tb/events.out.tfevents") for k in fake_gcs)

    records = addition_records(2, seed=0)
    r = Rollouts(records=records, group_size=1, prompt_tokens=np.ones((2, 3), np.int32),
                 prompt_mask=np.ones((2, 3), np.int32), tokens=np.array([[5, 1], [6, 7]], np.int32),
                 logprobs=np.full((2, 2), -0.5, np.float32), lengths=np.array([2, 2], np.int32),
                 truncated=np.array([False, True]), texts=[], logprob_gap_max=0.25)
    save_rollouts("gs://bucket/run/checkpoints/pending_rollouts_1.npz", r)
    back = load_rollouts("gs://bucket/run/checkpoints/pending_rollouts_1.npz", records, char_tokenizer(), (1,))
    np.testing.assert_array_equal(back.tokens, r.tokens)
    assert back.logprob_gap_max == 0.25


def test_save_hf_and_load_hf_on_an_object_store(fake_gcs, tmp_path):
    from exprl_jax.models.hf import load_hf, save_hf

    config = ModelConfig.tiny()
    params = random_params(config)
    save_hf("gs://bucket/model", config, params, max_shard_bytes=50_000)
    assert "/bucket/model/model.safetensors.index.json" in fake_gcs
    loaded_config, loaded = load_hf("gs://bucket/model")
    assert loaded_config == config.replace(param_dtype=config.param_dtype)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_with_a_gs_workdir_writes_nothing_to_local_disk(fake_gcs, tmp_path, monkeypatch):
    """Every workdir file goes through epath: with the workdir on the (fake) object store, the local working
    directory stays empty. Orbax writes arrays with tensorstore, which has its own gs:// client, so only the
    checkpoint directory is redirected to a local one here."""
    from exprl_jax import experiment
    from exprl_jax.checkpoint import Checkpointer
    from exprl_jax.judge.cache import JudgeCache
    from exprl_jax.metrics import read_metrics

    monkeypatch.setattr(experiment, "Checkpointer",
                        lambda directory, **kw: Checkpointer(tmp_path / "checkpoints", **kw))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = smoke_config(**{"train.steps": 2, "eval.at_start": True, "eval.num_samples": 2, "judge.overlap": True})
    results = experiment.Experiment(cfg, "gs://bucket/run").run()
    assert os.listdir(work) == []  # no "gs:" directory: no os.path / open() on a workdir path
    names = {k.removeprefix("/bucket/run/") for k in fake_gcs}
    assert {"config.json", "results.json", "eval_start.json", "final_hf/model.safetensors", "final_hf/config.json",
            "final_hf/tokenizer.json"} <= names, names
    assert any(n.startswith("tb/events.out.tfevents") for n in names)
    rows = read_metrics("gs://bucket/run/metrics.jsonl")  # appended as parts: the store cannot append
    assert [r["step"] for r in rows if "loss/total" in r] == [1, 2]
    calls = sum(r.get("judge/calls", 0) for r in rows)
    with JudgeCache("gs://bucket/run/judge_cache") as cache:
        assert len(cache) >= calls > 0  # the training calls, and the canaries of each evaluation
    assert json.loads(fake_gcs["/bucket/run/results.json"].getvalue())["params_sha256"] == results["params_sha256"]
    again = experiment.Experiment(cfg, "gs://bucket/run").run()  # finished: read back from the store
    assert again["params_sha256"] == results["params_sha256"]
