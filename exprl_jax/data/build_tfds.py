"""python -m exprl_jax.data.build_tfds --data_dir=DIR [--configs=gsm8k,math] [--shared_data=PATH]

Builds the `exprl_qa` TFDS configs (ArrayRecord, no TensorFlow) from the shared data folder and prints the record
count of every split. A config already built in DIR is left as it is.
"""
from __future__ import annotations

import argparse
import os

from exprl_jax.data.sources import DATASETS, SHARED_DATA_ENV, shared_data_dir


def build(data_dir: str, configs=None, shared_data: str | None = None, *, quiet: bool = False) -> dict:
    """Builds `configs` (default: all) into `data_dir`; returns {config: {split: number of records}}."""
    import tensorflow_datasets as tfds

    from exprl_jax.data import exprl_qa  # noqa: F401  (registers the builder)

    unknown = sorted(set(configs or ()) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown exprl_qa config(s) {unknown}; known: {', '.join(DATASETS)}")
    manual_dir = shared_data_dir(shared_data)
    if quiet:
        tfds.disable_progress_bar()
    counts = {}
    for name in configs or DATASETS:
        builder = tfds.builder(f"exprl_qa/{name}", data_dir=data_dir, file_format=exprl_qa.FILE_FORMAT)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        counts[name] = {split: info.num_examples for split, info in builder.info.splits.items()}
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="the TFDS data folder to write")
    parser.add_argument("--configs", default="", help=f"comma-separated, default all: {','.join(DATASETS)}")
    parser.add_argument("--shared_data", default=None,
                        help=f"the shared data folder (default ${SHARED_DATA_ENV}, else ../shared/data)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()] or None
    counts = build(os.path.expanduser(args.data_dir), configs, args.shared_data)
    for name, splits in counts.items():
        print(f"exprl_qa/{name}: " + ", ".join(f"{split} {n:,}" for split, n in sorted(splits.items())), flush=True)


if __name__ == "__main__":
    main()
