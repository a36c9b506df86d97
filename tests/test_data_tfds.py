"""Data through tensorflow-datasets without TensorFlow: the `exprl_qa` builder on a tiny shared-data folder (built in
a tmp dir), read back lazily and per process with `tfds.data_source`; the loaders of the real shared datasets; bad
rows named by dataset, record and field; a run fed by `data.source="tfds"`."""
import json
import os
import sys

import pytest

from conftest import SHARED_DATA, smoke_config

from exprl_jax.data import DataError, QARecord, indices_at, records_at, step_indices
from exprl_jax.data.sources import DATASETS, SHARED_DATA_ENV, load_dataset, shared_data_dir

GSM8K_ROWS = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many?",
               "answer": f"{i} + {i + 1} = <<{i}+{i + 1}={2 * i + 1}>>{2 * i + 1}\n#### {2 * i + 1}"}
              for i in range(7)]
MATH_ROWS = [{"problem": f"Compute ${i}+{i}$.", "solution": f"${i}+{i}=\\boxed{{{2 * i}}}$.", "idx": i}
             for i in range(5)]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def tiny_shared(tmp_path):
    """A shared-data folder with the layout of ../shared/data and a few records per file."""
    root = tmp_path / "shared_data"
    write_jsonl(str(root / "gsm8k" / "train.jsonl"), GSM8K_ROWS[:5])
    write_jsonl(str(root / "gsm8k" / "test.jsonl"), GSM8K_ROWS[5:])
    write_jsonl(str(root / "math_full_test" / "test.jsonl"), MATH_ROWS)
    math500 = [{"problem": r["problem"], "solution": r["solution"], "answer": str(2 * r["idx"]),
                "unique_id": f"test/algebra/{r['idx']}.json"} for r in MATH_ROWS[3:]]
    write_jsonl(str(root / "math500" / "test.jsonl"), math500)
    return str(root)


def test_the_package_keeps_every_import():
    import exprl_jax.data as data
    from exprl_jax.data.records import read_jsonl

    assert data.read_jsonl is read_jsonl
    for name in ("QARecord", "DataError", "read_jsonl", "write_jsonl", "load_gsm8k", "load_math", "build_prompt",
                 "step_indices", "GSM8K_ANSWER_MARK", "QA_FIELDS", "ON_BAD_ROW"):
        assert hasattr(data, name), name


def test_shared_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    assert shared_data_dir(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert shared_data_dir() == str(tmp_path)
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"missing.*\\${SHARED_DATA_ENV}"):
        shared_data_dir()
    monkeypatch.delenv(SHARED_DATA_ENV)
    if os.path.isdir(SHARED_DATA):  # a checkout with shared/ next to it (CI, a fresh clone beside it)
        assert os.path.samefile(shared_data_dir(), SHARED_DATA)


def test_build_and_read_back_without_tensorflow(tiny_shared, tmp_path):
    from exprl_jax.data.build_tfds import build
    from exprl_jax.data.tfds_reader import TfdsRecords, open_tfds

    counts = build(str(tmp_path / "tfds"), ["gsm8k", "math"], tiny_shared, quiet=True)
    # math: train = the full test set minus the MATH-500 problems (matched by text): 5 - 2 = 3
    assert counts == {"gsm8k": {"train": 5, "test": 2}, "math": {"train": 3, "test": 2}}
    expected = load_dataset("gsm8k", tiny_shared)
    train = open_tfds("exprl_qa/gsm8k", "train", str(tmp_path / "tfds"), build_if_missing=False)
    assert isinstance(train, TfdsRecords) and len(train) == 5
    assert list(train) == expected["train"]  # every field, in source order
    assert train[1] == QARecord(id="gsm8k/train/2", problem=GSM8K_ROWS[1]["question"],
                                reference=GSM8K_ROWS[1]["answer"], answer="3", domain="math")
    assert train[1:3] == expected["train"][1:3] and train[-1] == expected["train"][-1]
    sliced = open_tfds("exprl_qa/gsm8k", "train[2:4]", str(tmp_path / "tfds"))
    assert list(sliced) == expected["train"][2:4]
    math_train = open_tfds("exprl_qa/math", "train", str(tmp_path / "tfds"))
    assert [r.answer for r in math_train] == ["0", "2", "4"]
    assert "tensorflow" not in sys.modules
    with pytest.raises(ValueError, match="has no split 'validation'; it has test, train"):
        open_tfds("exprl_qa/gsm8k", "validation", str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="build_tfds .*--configs=math500"):
        open_tfds("exprl_qa/math500", "test", str(tmp_path / "tfds"), build_if_missing=False)
    built = open_tfds("exprl_qa/math500", "test", str(tmp_path / "tfds"), shared_data=tiny_shared)  # built once
    assert [r.id for r in built] == ["math500/test/algebra/3.json", "math500/test/algebra/4.json"]


def test_a_bad_row_names_the_dataset_the_record_and_the_field(tiny_shared, tmp_path):
    from exprl_jax.data.build_tfds import build
    from exprl_jax.data.tfds_reader import TfdsRecords

    rows = [dict(r) for r in GSM8K_ROWS[:3]]
    rows[1]["answer"] = "no final answer here"
    write_jsonl(os.path.join(tiny_shared, "gsm8k", "train.jsonl"), rows)
    with pytest.raises(DataError, match=r"^exprl_qa/gsm8k: .*gsm8k/train.jsonl:2: field 'answer': no final answer"):
        build(str(tmp_path / "tfds"), ["gsm8k"], tiny_shared, quiet=True)
    records = TfdsRecords([{"id": b"a", "problem": b"p", "reference": b"", "answer": b"1", "domain": b"math"}],
                          "exprl_qa/x[train]")
    with pytest.raises(DataError, match=r"exprl_qa/x\[train\]: record 0: field 'reference': missing or empty"):
        records[0]


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="needs ../shared/data")
def test_every_shared_dataset_loads_in_full():
    """Counts as in shared/data/README.md (math: the full test set minus MATH-500)."""
    counts = {name: {split: len(records) for split, records in load_dataset(name).items()} for name in DATASETS}
    assert counts == {
        "gsm8k": {"train": 7473, "test": 1319}, "math": {"train": 4500, "test": 500}, "math500": {"test": 500},
        "aime": {"train": 975, "test": 30}, "omni_math": {"test": 2821}, "olympiadbench": {"test": 675},
        "minerva_math": {"test": 272}, "champ": {"test": 270}, "strategyqa": {"test": 2290},
        "cose_cqa": {"validation": 950}}
    minerva = load_dataset("minerva_math")["test"]
    assert {r.domain for r in minerva} == {"math", "science"}


class CountingSource:
    """A data source that records which rows were read."""

    def __init__(self, rows):
        self.rows, self.read = rows, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.read.append(i)
        return self.rows[i]


def test_each_process_reads_only_its_share_of_the_global_batch():
    from exprl_jax.data.tfds_reader import TfdsRecords

    rows = [{"id": f"r{i}".encode(), "problem": b"p", "reference": b"r", "answer": b"1", "domain": b"math"}
            for i in range(11)]
    global_batch = step_indices(11, 8, 5, seed=3)
    shares = []
    for p in range(4):
        source = CountingSource(rows)
        records = records_at(TfdsRecords(source, "x"), 8, 5, 3, process_index=p, process_count=4)
        assert sorted(source.read) == sorted(global_batch[2 * p:2 * p + 2])  # nothing else is read
        shares += [int(r.id[1:]) for r in records]
    assert shares == global_batch  # the shares, in process order, are the one-process batch
    assert indices_at(range(11), 8, 5, 3) == global_batch
    with pytest.raises(ValueError, match="8 records per step do not split evenly over 3 processes"):
        indices_at(range(11), 8, 5, 3, process_index=0, process_count=3)


def test_a_run_fed_by_tfds(tiny_shared, tmp_path):
    """data.source="tfds": the records of each step are the data cursor's picks from the TFDS split (a pure
    function of the step, so a resumed run gets the same ones), and the run trains."""
    from exprl_jax.build import load_records
    from exprl_jax.experiment import Experiment

    cfg = smoke_config(**{"method": "sft", "data.source": "tfds", "data.tfds_name": "exprl_qa/gsm8k",
                          "data.tfds_data_dir": str(tmp_path / "tfds"), "data.shared_data": tiny_shared,
                          "train.steps": 2, "train.batch_size": 8, "train.seq_len": 96, "eval.at_end": False,
                          "eval.at_start": False})
    train, evals, _ = load_records(cfg)
    assert len(train) == 5 and [r.id for r in evals] == ["gsm8k/test/1", "gsm8k/test/2"]
    exp = Experiment(cfg, str(tmp_path / "run"))
    exp.train_records = train
    expected = [train[i] for i in step_indices(5, 8, 1, cfg.seed)]
    assert exp.records_at(1) == expected and exp.cursor(1) == step_indices(5, 8, 1, cfg.seed)[:1]
    results = Experiment(cfg, str(tmp_path / "run")).run()
    assert results["steps"] == 2 and os.path.isdir(tmp_path / "run" / "final_hf")
