"""Reading `exprl_qa` (or any TFDS dataset with the same text features) without TensorFlow: `tfds.data_source`
gives random access to the ArrayRecord files, and `TfdsRecords` turns row i into a QARecord only when it is
indexed, so a process that feeds only its share of each step (`cursor.records_at`) reads only those rows.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

from exprl_jax.data.records import DataError, QARecord

REQUIRED = ("id", "problem", "reference", "answer")
READ_BLOCK = 256  # rows per batched read when iterating


class TfdsRecords(Sequence):
    """A lazy, read-only sequence of QARecords over one split of a TFDS dataset (slices are read into lists)."""

    def __init__(self, source, name: str):
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._record(self.source[i], i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: record {index} out of range ({len(self)} records)")
        return self._record(self.source[index], index)

    def __iter__(self) -> Iterator[QARecord]:
        for start in range(0, len(self), READ_BLOCK):
            indices = list(range(start, min(start + READ_BLOCK, len(self))))
            for i, row in zip(indices, self.source.__getitems__(indices)):
                yield self._record(row, i)

    def _record(self, row: dict, index: int) -> QARecord:
        """Row → QARecord; a missing or blank field is a DataError naming the dataset, the index and the field."""
        values = {}
        for field in REQUIRED + ("domain",):
            value = row.get(field)
            value = value.decode("utf-8") if isinstance(value, bytes) else value
            if field in REQUIRED and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"{self.name}: record {index}: field '{field}': missing or empty")
            values[field] = value or None if field == "domain" else value
        return QARecord(**values)


def open_tfds(name: str, split: str, data_dir: str = "", *, build_if_missing: bool = True,
              shared_data: str | None = None) -> TfdsRecords:
    """The records of `name` ("exprl_qa/gsm8k") split `split` (TFDS slicing allowed: "test[:200]") under
    `data_dir` ("" = TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets). An `exprl_qa` config that is not
    built yet is built first from the shared data folder (nothing is downloaded) when `build_if_missing`."""
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if name.split("/")[0] == "exprl_qa":
        from exprl_jax.data import exprl_qa

        builder = tfds.builder(name, data_dir=data_dir, file_format=exprl_qa.FILE_FORMAT)
        if not builder.is_prepared():
            if not build_if_missing:
                raise FileNotFoundError(f"{name} is not built in {builder.data_dir}; run python -m "
                                        f"exprl_jax.data.build_tfds --data_dir={data_dir or '~/tensorflow_datasets'} "
                                        f"--configs={name.split('/', 1)[-1]}")
            from exprl_jax.data.build_tfds import build

            print(f"building {name} into {data_dir or 'the TFDS default folder'} (once)", flush=True)
            build(data_dir or builder.data_dir_root, [name.split("/", 1)[1]], shared_data, quiet=True)
            builder = tfds.builder(name, data_dir=data_dir, file_format=exprl_qa.FILE_FORMAT)  # now with its splits
        splits = builder.info.splits
        if split.split("[")[0] not in splits:
            raise ValueError(f"{name} has no split {split!r}; it has {', '.join(sorted(splits))}")
    return TfdsRecords(tfds.data_source(name, split=split, data_dir=data_dir), f"{name}[{split}]")
