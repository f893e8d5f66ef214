r"""Writes the TFDS metadata that `tfds.testing.mock_data` reads in tests/test_pipeline.py.

Offline, from the builders' code in the pinned tensorflow-datasets, with the published split
sizes of each dataset (nothing is downloaded). Run from the repository root:

    python tests/testdata/tfds/make_metadata.py

It writes `tests/testdata/tfds/<dataset>/<version>/{dataset_info.json,features.json}`.
"""

import os

import tensorflow_datasets as tfds

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> {split: (num_examples, num_bytes)}, as the TFDS catalog publishes them.
SPLITS = {
    "lm1b": {"train": (30_301_028, 4_001_548_958), "test": (306_688, 40_516_463)},
    "tiny_shakespeare": {"train": (1, 1_003_854), "validation": (1, 55_770),
                         "test": (1, 55_770)},
}


def main():
  for name, splits in SPLITS.items():
    builder = tfds.builder(name, data_dir=HERE, file_format="array_record")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num], num_bytes=size,
                            filename_template=None)
        for split, (num, size) in splits.items()]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    print("wrote", builder.data_path)


if __name__ == "__main__":
  main()
