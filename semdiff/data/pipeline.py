"""Input pipelines: text sources -> tokens -> fixed-shape batches, with grain.

Every dataset is a random-access source of text examples (`grain.MapDataset`),
so sharding across processes, seeded shuffling and exact resumption come from
grain itself: the training iterator's state is a small dict saved with each
checkpoint, and a restored iterator yields exactly the batches an uninterrupted
run would have seen.

Batches are dicts of NumPy arrays, per process:
  tokens: int32 [b, L] token ids, PAD after the example;
  mask:   bool  [b, L] true on real tokens (a prefix of each row).
"""

import dataclasses
from typing import Callable, Iterator, Optional, Sequence

import grain
import numpy as np

from semdiff.data import grammar as grammar_lib
from semdiff.data.tokenizer import PAD_ID, Tokenizer

SPLITS = ("train", "validation", "test")
# The grammar corpus is unbounded; this many indices stand for "endless".
_GRAMMAR_TRAIN_SIZE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class GrammarSentence:
  """Sentence ``index`` of a grammar split, generated from its own seed."""

  seed: int
  split: str

  def __call__(self, index: int) -> str:
    return grammar_lib.sentence_at(self.split, index, self.seed)


def _grammar_source(config, split: str) -> grain.MapDataset:
  size = _GRAMMAR_TRAIN_SIZE if split == "train" else int(config.data.eval_examples)
  return grain.MapDataset.range(size).map(GrammarSentence(int(config.data.seed), split))


DATASETS: dict[str, Callable[..., grain.MapDataset]] = {
    "grammar": _grammar_source,
}


def text_source(config, split: str) -> grain.MapDataset:
  """The text examples of ``split`` for ``config.data.name``."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
  name = config.data.name
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))} "
                     "(--config.data.name=...).")
  return DATASETS[name](config, split)


def tokenizer_texts(config) -> Callable[[], Iterator[str]]:
  """The training texts that a new tokenizer is trained on (a bounded sample)."""
  def texts():
    source = text_source(config, "train")
    n = min(len(source), int(config.data.tokenizer_sentences))
    for i in range(n):
      yield source[i]
  return texts


@dataclasses.dataclass(frozen=True)
class Encode:
  """Text -> fixed-length ids and mask (None if empty or longer than max_len)."""

  tokenizer: Tokenizer
  max_len: int

  def __call__(self, text: str):
    ids = self.tokenizer.encode(text)
    if not ids or len(ids) > self.max_len:
      return None
    tokens = np.full((self.max_len,), PAD_ID, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros((self.max_len,), bool)
    mask[:len(ids)] = True
    return {"tokens": tokens, "mask": mask}


def _encoded(config, tokenizer: Tokenizer, split: str, process_index: int,
             process_count: int) -> grain.IterDataset:
  ds = text_source(config, split)
  if split == "train" and config.data.name != "grammar":
    # The grammar corpus is i.i.d. already; other sources are shuffled per epoch.
    ds = ds.shuffle(seed=int(config.seed)).repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(Encode(tokenizer, int(config.data.max_len)))
  # grain's default of 16 reader threads starves the training step on small hosts.
  options = grain.ReadOptions(num_threads=int(config.data.read_threads),
                              prefetch_buffer_size=int(config.data.prefetch))
  return ds.to_iter_dataset(options).filter(_not_none)


def _not_none(example) -> bool:
  return example is not None


def train_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """This process's endless iterator of training batches (checkpointable).

  The global batch ``config.train.batch_size`` is split evenly over processes.
  """
  batch = int(config.train.batch_size)
  if batch % process_count:
    raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} "
                     "processes; pick a multiple.")
  ds = _encoded(config, tokenizer, "train", process_index, process_count)
  return iter(ds.batch(batch // process_count, drop_remainder=True))


def eval_batches(config, tokenizer: Tokenizer, split: str = "validation", *,
                 batch_size: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
  """All held-out batches of this process (the last one padded with empty rows)."""
  batch_size = batch_size or int(config.train.batch_size)
  examples = list(_encoded(config, tokenizer, split, process_index, process_count))
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    tokens = np.full((batch_size, int(config.data.max_len)), PAD_ID, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, ex in enumerate(chunk):
      tokens[i], mask[i] = ex["tokens"], ex["mask"]
    batches.append({"tokens": tokens, "mask": mask})
  return batches


def texts(config, split: str, num: int) -> list[str]:
  """The first ``num`` text examples of ``split`` (for evaluation and display)."""
  source = text_source(config, split)
  return [source[i] for i in range(min(num, len(source)))]
