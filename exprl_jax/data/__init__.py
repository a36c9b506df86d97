"""QA-with-reference data: records and JSONL (`records`), the loaders of the shared datasets (`sources`), the
TFDS builder `exprl_qa` and its reader (`exprl_qa`, `tfds_reader`, `build_tfds`), mixtures of domains
(`mixture`), the data cursor (`cursor`) and the hard-problem filter (`hard_filter`).

TensorFlow Datasets is imported only by the modules that need it.
"""
from exprl_jax.data.cursor import indices_at, process_share, records_at, step_indices
from exprl_jax.data.records import (GSM8K_ANSWER_MARK, ON_BAD_ROW, QA_FIELDS, DataError, QARecord, build_prompt,
                                    load_gsm8k, load_math, read_jsonl, write_jsonl)

__all__ = ["GSM8K_ANSWER_MARK", "ON_BAD_ROW", "QA_FIELDS", "DataError", "QARecord", "build_prompt", "indices_at",
           "load_gsm8k", "load_math", "process_share", "read_jsonl", "records_at", "step_indices", "write_jsonl"]
