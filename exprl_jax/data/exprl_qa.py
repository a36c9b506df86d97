"""The TFDS builder `exprl_qa`: one config per dataset of `sources.DATASETS` (gsm8k, math, math500, aime, omni_math,
olympiadbench, minerva_math, champ, strategyqa, cose_cqa), records `{id, problem, reference, answer, domain}` in
source order. It reads the shared data folder as TFDS's manual_dir and is written as ArrayRecord, so neither
building nor reading needs TensorFlow (`tfds.data_source`). Build with `python -m exprl_jax.data.build_tfds`.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from exprl_jax.data.sources import DATASETS, load_dataset

FEATURES = ("id", "problem", "reference", "answer", "domain")
FILE_FORMAT = "array_record"


class QaConfig(tfds.core.BuilderConfig):
    """One dataset of the shared data folder."""


class ExprlQa(tfds.core.GeneratorBasedBuilder):
    """QA problems with hidden reference solutions (SPEC §1), one config per dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: id, problem, reference, answer, domain."}
    BUILDER_CONFIGS = [QaConfig(name=name, description=spec.description) for name, spec in DATASETS.items()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Nothing is downloaded: manual_dir is the shared data folder (gsm8k/, math500/, "
                                    "...), see exprl_jax.data.sources.shared_data_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({name: tfds.features.Text() for name in FEATURES}),
            disable_shuffling=True,  # record i is the source's i-th record: ids and indices stay meaningful
        )

    def _split_generators(self, dl_manager):
        splits = load_dataset(self.builder_config.name, str(dl_manager.manual_dir))
        return {split: self._generate_examples(records) for split, records in splits.items()}

    def _generate_examples(self, records):
        for i, record in enumerate(records):
            yield i, {name: getattr(record, name) for name in FEATURES}
