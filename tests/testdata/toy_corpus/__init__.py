"""A tiny TFDS builder, prepared offline by tests/test_pipeline.py (no download).

Importing this package registers the builder as `toy_corpus`, so the pipeline reads it as
`data.name = "tfds:toy_corpus"` through the same code path as any TFDS catalog dataset. It has
only a train split (the pipeline holds out its last 1%), and three bad records: an empty text,
a text that is not UTF-8, and a long paragraph.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_RECORDS = 300
BAD_BYTES = b"caf\xe9 \xff"  # Latin-1, not UTF-8


def text(i: int):
  """Record i's text: "Record i says hello." with three exceptions."""
  if i == 7:
    return ""
  if i == 11:
    return BAD_BYTES
  if i == 13:
    return " ".join(f"Sentence {k} of the long record." for k in range(40))
  return f"Record {i} says hello."


class ToyCorpus(tfds.core.GeneratorBasedBuilder):
  """300 short texts with a few bad ones."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "id": tfds.features.Scalar(dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(NUM_RECORDS):
      yield i, {"text": text(i), "id": i}
