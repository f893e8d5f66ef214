"""Input pipelines: text sources -> tokens -> fixed-shape batches, with grain.

Every dataset (`config.data.name`, see `DATASETS` and `tfds_sources.CATALOG`) is a
random-access source of texts (`grain.MapDataset`), so sharding across processes, seeded
shuffling and exact resumption come from grain itself:

    source -> shuffle(config.seed), every epoch anew (not the grammar corpus: it is i.i.d.)
           -> [process_index::process_count]
           -> tokenize; cut texts longer than max_len at sentence boundaries (data.split_long)
              or drop them                              (grain reader threads, read ahead)
           -> flatten, batch                            (TrainIterator)

A source yields `str`, or a `Skipped` marker for a record that holds no usable text (kept in
the stream so that it is counted where it is consumed). The training iterator's state is a
small JSON-able dict saved with each checkpoint; a restored iterator yields exactly the batches
an uninterrupted run would have seen, and its `stats` count exactly what they consumed.

Batches are dicts of NumPy arrays, per process:
  tokens: int32 [b, L] token ids, PAD after the example;
  mask:   bool  [b, L] true on real tokens (a prefix of each row).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterator, NamedTuple, Optional

import grain
import numpy as np
from absl import logging

from semdiff.data import grammar as grammar_lib
from semdiff.data import text_files as text_files_lib
from semdiff.data import tfds_sources
from semdiff.data.tokenizer import PAD_ID, Tokenizer

SPLITS = ("train", "validation", "test")
SKIP_REASONS = ("empty", "undecodable", "bad_json", "missing_field", "too_long")
# The grammar corpus is unbounded; this many indices stand for "endless".
_GRAMMAR_TRAIN_SIZE = 2**31 - 1
_REPORT_SAMPLE = 1000  # training texts encoded by `describe` to count long ones


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record without usable text: ``reason`` (one of SKIP_REASONS) and where it was."""

  reason: str
  where: str


# --- sources ---------------------------------------------------------------------------------


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


def _text_files_source(config, split: str) -> grain.MapDataset:
  """The texts of ``data.files``: the last ``eval_fraction`` held out, or ``eval_files``."""
  d = config.data
  load = functools.partial(text_files_lib.load, unit=d.unit, field=d.jsonl_field)
  if d.eval_files:
    files = load(d.files if split == "train" else d.eval_files)
    return grain.MapDataset.source(files)
  files = load(d.files)
  fraction = float(d.eval_fraction)
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"data.eval_fraction={fraction} must be in (0, 1), or set "
                     "data.eval_files to held-out files.")
  held_out = max(1, math.ceil(len(files) * fraction))
  if held_out >= len(files):
    raise ValueError(f"data.files={d.files!r} holds {len(files)} text(s): too few to hold "
                     f"out data.eval_fraction={fraction} of them for validation; add text, or "
                     "set data.eval_files.")
  ds = grain.MapDataset.source(files)
  return ds[:-held_out] if split == "train" else ds[-held_out:]


@dataclasses.dataclass(frozen=True)
class RecordText:
  """A TFDS record -> its text (str), or `Skipped`."""

  key: str
  name: str

  def __call__(self, index: int, record) -> Any:
    value = record[self.key]
    if isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError:
        return Skipped("undecodable", f"{self.name} record {index}")
    if not isinstance(value, str):
      return Skipped("missing_field", f"{self.name} record {index}")
    value = value.strip()
    return value if value else Skipped("empty", f"{self.name} record {index}")


def _tfds_source(config, split: str, name: Optional[str] = None) -> grain.MapDataset:
  d = config.data
  entry = tfds_sources.entry_for(name or d.name, d.text_key)
  source = tfds_sources.data_source(entry, split, data_dir=d.tfds_data_dir,
                                    download=bool(d.tfds_download))
  ds = grain.MapDataset.source(source.records).map_with_index(
      RecordText(source.text_key, f"{entry.tfds_name} {source.split}"))
  if entry.documents:  # a few whole texts: cut them into lines or paragraphs, in memory
    ds = grain.MapDataset.source(_units([ds[i] for i in range(len(ds))], d.unit))
  return ds


def _units(documents: list, unit: str) -> list:
  if unit not in text_files_lib.UNITS:
    raise ValueError(f"data.unit={unit!r} is not supported: use one of {text_files_lib.UNITS}.")
  pattern = r"\n" if unit == "line" else r"\n[ \t\r]*\n"
  units = []
  for doc in documents:
    if isinstance(doc, Skipped):
      units.append(doc)
    else:
      units.extend(u.strip() for u in re.split(pattern, doc) if u.strip())
  return units


DATASETS: dict[str, Callable[..., grain.MapDataset]] = {
    "grammar": _grammar_source,
    "text_files": _text_files_source,
    **{name: functools.partial(_tfds_source, name=name) for name in tfds_sources.CATALOG},
}


def dataset_names() -> list[str]:
  """The values `data.name` takes (`tfds:<name>` stands for any TFDS catalog dataset)."""
  return sorted(DATASETS) + [tfds_sources.PREFIX + "<catalog name>"]


def text_source(config, split: str) -> grain.MapDataset:
  """The texts of ``split`` for ``config.data.name``: `str`, or `Skipped` for bad records.

  Held-out splits hold at most ``data.eval_examples`` texts.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
  name = config.data.name
  if name in DATASETS:
    ds = DATASETS[name](config, split)
  elif name.startswith(tfds_sources.PREFIX):
    ds = _tfds_source(config, split)
  else:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(dataset_names())} "
                     "(--config.data.name=...).")
  if split != "train" and len(ds) > int(config.data.eval_examples):
    ds = ds[:int(config.data.eval_examples)]
  return ds


def _shuffled_train(config) -> grain.MapDataset:
  """The training texts in the order of the first epoch (grammar: as generated)."""
  ds = text_source(config, "train")
  return ds if config.data.name == "grammar" else ds.shuffle(seed=int(config.seed))


def tokenizer_texts(config) -> Callable[[], Iterator[str]]:
  """The texts a new tokenizer is trained on: a bounded random sample of the training split.

  The first ``data.tokenizer_sentences`` texts of the shuffled training split (the grammar
  corpus is i.i.d. already), as str; bad records are left out.
  """
  def texts():
    source = _shuffled_train(config)
    n = min(len(source), int(config.data.tokenizer_sentences))
    for i in range(n):
      text = source[i]
      if isinstance(text, str):
        yield text
  return texts


def texts(config, split: str, num: int) -> list[str]:
  """The first ``num`` texts of ``split`` (for evaluation and display); bad records skipped."""
  source = text_source(config, split)
  return [t for t in (source[i] for i in range(min(num, len(source)))) if isinstance(t, str)]


# --- tokenization ----------------------------------------------------------------------------


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


class Encoded(NamedTuple):
  """What one text gave: its examples, or why it gave none.

  examples: int32 [n_i] arrays, 0 < n_i <= max_len (none if skipped);
  skipped:  the reason (SKIP_REASONS) or None;
  where:    where the skipped text was, or "";
  cut:      the text was cut into several examples.
  """

  examples: list
  skipped: Optional[str] = None
  where: str = ""
  cut: bool = False


# Sentence ends: ".", "!", "?", "…" (any run), before closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*$")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class PieceTables(NamedTuple):
  """bool [vocab] tables of a tokenizer's pieces, for cutting texts."""

  word_start: np.ndarray  # begins a word (Tokenizer.word_start_table)
  space: np.ndarray       # only whitespace
  newline: np.ndarray     # holds a line break
  ends: np.ndarray        # ends a sentence: ".", "!", "?", "…", maybe before closing quotes


@functools.lru_cache(maxsize=8)
def piece_tables(tokenizer: Tokenizer) -> PieceTables:
  """The `PieceTables` of ``tokenizer`` (computed once per tokenizer)."""
  size = tokenizer.vocab_size
  space, newline, ends = (np.zeros(size, bool) for _ in range(3))
  for i in range(size):
    piece = tokenizer.pieces([i])
    if not piece:  # pad, bos, eos
      continue
    byte = _BYTE_PIECE.match(piece[0])
    text = chr(int(byte.group(1), 16)) if byte else piece[0].replace("\u2581", " ")
    space[i] = not text.strip()
    newline[i] = "\n" in text
    ends[i] = bool(_SENTENCE_END.search(text.rstrip()))
  return PieceTables(tokenizer.word_start_table, space, newline, ends)


def cut_at_sentences(ids: np.ndarray, max_len: int, tables: PieceTables) -> list[np.ndarray]:
  """int [n] ids -> pieces of at most ``max_len`` ids, cut where a sentence starts.

  Each piece holds as many whole sentences as fit. A sentence longer than ``max_len`` is cut
  at a line start (verse), else at a word start, else anywhere. Whitespace tokens at the cuts
  and at the ends are left out: concatenated, the pieces are ``ids`` without them.
  """
  ids = np.asarray(ids, np.int32)
  n = len(ids)
  solid = ~tables.space[ids]
  if not solid.any():
    return []
  positions = np.arange(n)
  # Word starts; after a line break the word's piece has no "▁" but follows a space piece.
  after_space = np.concatenate([[True], ~solid[:-1]])
  starts = solid & (tables.word_start[ids] | after_space)
  # The last non-whitespace token before each position (-1: none).
  last_solid = np.maximum.accumulate(np.where(solid, positions, -1))
  before = np.concatenate([[-1], last_solid[:-1]])
  sentence = starts & (before >= 0) & tables.ends[ids[np.maximum(before, 0)]]
  line = starts & np.concatenate([[False], tables.newline[ids[:-1]]])
  tiers = [np.flatnonzero(sentence), np.flatnonzero(line), np.flatnonzero(starts)]
  pieces = []
  start = int(np.argmax(solid))
  while n - start > max_len:
    limit = start + max_len
    end = next((p for p in (_last_in(t, start, limit) for t in tiers) if p), limit)
    pieces.append(ids[start:int(last_solid[end - 1]) + 1])
    start = end
    while start < n and not solid[start]:
      start += 1
  if start < n:
    pieces.append(ids[start:int(last_solid[-1]) + 1])
  return pieces


def _last_in(sorted_pos: np.ndarray, low: int, high: int) -> Optional[int]:
  """The largest position p with low < p <= high, or None."""
  i = int(np.searchsorted(sorted_pos, high, side="right")) - 1
  return int(sorted_pos[i]) if i >= 0 and sorted_pos[i] > low else None


@dataclasses.dataclass(frozen=True)
class Examples:
  """A text (or `Skipped`) -> `Encoded`: its examples of at most ``max_len`` tokens.

  A longer text is cut at sentence boundaries when ``split_long``, else dropped (too_long).
  """

  tokenizer: Tokenizer
  max_len: int
  split_long: bool

  def __call__(self, text) -> Encoded:
    if isinstance(text, Skipped):
      return Encoded([], text.reason, text.where)
    ids = self.tokenizer.encode(text)
    if not ids:
      return Encoded([], "empty", "")
    if len(ids) <= self.max_len:
      return Encoded([np.asarray(ids, np.int32)])
    if not self.split_long:
      return Encoded([], "too_long", "")
    pieces = cut_at_sentences(ids, self.max_len, piece_tables(self.tokenizer))
    return Encoded(pieces, cut=True)


# --- statistics ------------------------------------------------------------------------------


@dataclasses.dataclass
class DataStats:
  """What a stream of texts gave: examples, texts cut, and texts skipped per reason.

  Attributes:
    texts: texts (records) consumed, skipped ones included.
    examples: examples produced (a cut text gives several).
    cut: texts longer than max_len cut at sentence boundaries.
    skipped: reason -> texts skipped for it (see SKIP_REASONS).
    first: reason -> where the first skipped one was, where known.
  """

  texts: int = 0
  examples: int = 0
  cut: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  first: dict[str, str] = dataclasses.field(default_factory=dict)

  def add(self, encoded: Encoded) -> None:
    self.texts += 1
    self.examples += len(encoded.examples)
    self.cut += encoded.cut
    if encoded.skipped:
      self.skipped[encoded.skipped] = self.skipped.get(encoded.skipped, 0) + 1
      if encoded.where:
        self.first.setdefault(encoded.skipped, encoded.where)

  def copy(self) -> DataStats:
    """A copy (cheaper than copy.deepcopy, which costs a fifth of the reading time)."""
    return DataStats(self.texts, self.examples, self.cut, dict(self.skipped), dict(self.first))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, state: dict) -> DataStats:
    return cls(int(state["texts"]), int(state["examples"]), int(state["cut"]),
               dict(state["skipped"]), dict(state["first"]))

  def line(self) -> str:
    """One line: "12,000 texts -> 12,345 examples (40 cut); skipped: 3 empty, ..."."""
    text = f"{self.texts:,} texts -> {self.examples:,} examples ({self.cut:,} cut)"
    return text + "; skipped: " + _skips(self.skipped, self.first)


def _skips(skipped: dict, first: dict) -> str:
  parts = []
  for reason in sorted(skipped, key=lambda r: (SKIP_REASONS + (r,)).index(r)):
    where = f" (first: {first[reason]})" if reason in first else ""
    parts.append(f"{skipped[reason]:,} {reason}{where}")
  return ", ".join(parts) or "none"


@dataclasses.dataclass
class DataReport:
  """What the training data holds, from the source and a sample, for the start of a run.

  Attributes:
    dataset: ``data.name``.
    sizes: split -> number of texts (records) in it.
    scan: for text_files, what indexing the files found (exact, whole corpus), else None.
    sample: `DataStats` of the first texts of the shuffled training split (too long, cut,
      and for TFDS records also empty/undecodable).
    max_len, split_long: the settings the sample was encoded with.
  """

  dataset: str
  sizes: dict[str, int]
  scan: Optional[text_files_lib.ScanStats]
  sample: DataStats
  max_len: int
  split_long: bool

  def line(self) -> str:
    parts = [f"data {self.dataset}: " + " / ".join(
        f"{n:,} {split}" for split, n in self.sizes.items()) + " texts"]
    if self.scan is not None:
      s = self.scan
      parts.append(f"{s.files} file(s) ({s.empty_files} empty), skipped lines: "
                   + _skips(s.skipped, s.first))
    long = self.sample.cut if self.split_long else self.sample.skipped.get("too_long", 0)
    action = "cut at sentence boundaries" if self.split_long else "dropped as too_long"
    sample = (f"of the first {self.sample.texts:,} training texts {long:,} are longer than "
              f"{self.max_len} tokens ({action})")
    other = {r: n for r, n in self.sample.skipped.items() if r != "too_long"}
    if other:
      sample += "; skipped: " + _skips(other, self.sample.first)
    parts.append(sample)
    return " | ".join(parts)


def describe(config, tokenizer: Tokenizer, sample: int = _REPORT_SAMPLE) -> DataReport:
  """The `DataReport` of ``config``'s data (logged too); encodes ``sample`` training texts."""
  sizes = {split: len(text_source(config, split)) for split in ("train", "validation")}
  if config.data.name == "grammar":
    sizes.pop("train")  # endless
  scan = None
  if config.data.name == "text_files":
    scan = text_files_lib.load(config.data.files, unit=config.data.unit,
                               field=config.data.jsonl_field).stats
  stats = DataStats()
  source = _shuffled_train(config)
  encode = _examples(config, tokenizer)
  for i in range(min(sample, len(source))):
    stats.add(encode(source[i]))
  report = DataReport(config.data.name, sizes, scan, stats, int(config.data.max_len),
                      encode.split_long)
  logging.info("%s", report.line())
  return report


def _examples(config, tokenizer: Tokenizer) -> Examples:
  # Cutting would break the grammar corpus's exact per-sentence log-probabilities.
  split_long = bool(config.data.split_long) and config.data.name != "grammar"
  return Examples(tokenizer, int(config.data.max_len), split_long)


# --- iterators -------------------------------------------------------------------------------


# Texts per grain element. grain's per-element cost (futures, prefetch bookkeeping, metrics:
# ~90 us) was larger than reading and encoding a grammar sentence (~60 us); read in chunks of
# this many texts, the stream of texts and every saved position stay what they were.
TEXTS_PER_READ = 32


def _encoded(config, tokenizer: Tokenizer, split: str, process_index: int,
             process_count: int) -> grain.IterDataset:
  """This process's texts of ``split`` (train: shuffled, endless), each as an `Encoded`,
  in tuples of up to TEXTS_PER_READ consecutive texts."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  ds = text_source(config, split)
  if split == "train" and config.data.name != "grammar":
    # The grammar corpus is i.i.d. already; other sources are shuffled anew every epoch.
    ds = ds.shuffle(seed=int(config.seed)).repeat()
  ds = ds[process_index::process_count]
  ds = ds.batch(TEXTS_PER_READ, batch_fn=_EncodeAll(_examples(config, tokenizer)))
  # grain's default of 16 reader threads starves the training step on small hosts.
  options = grain.ReadOptions(
      num_threads=int(config.data.read_threads),
      prefetch_buffer_size=-(-int(config.data.prefetch) // TEXTS_PER_READ))
  return ds.to_iter_dataset(options)


@dataclasses.dataclass(frozen=True)
class _EncodeAll:
  """A chunk of texts -> a tuple of their `Encoded`."""

  encode: Examples

  def __call__(self, texts) -> tuple:
    return tuple(self.encode(text) for text in texts)


class TrainIterator:
  """This process's endless iterator of training batches, grain-style and checkpointable.

  ``next(it)`` gives {"tokens": int32 [b, L], "mask": bool [b, L]}; ``get_state()`` is a
  JSON-able dict and ``set_state(state)`` resumes exactly there. ``stats`` (`DataStats`)
  counts what the batches consumed so far, across restarts.

  A position in the stream is (grain's state before a chunk, a text's index in the chunk,
  an example's index in the text): a text cut into several examples may end in one batch
  and go on in the next.
  """

  def __init__(self, encoded: grain.IterDataset, batch_size: int, max_len: int):
    self._reader = iter(encoded)
    self._batch_size, self._max_len = batch_size, max_len
    self._chunk: tuple = ()                         # texts (`Encoded`) of the current chunk
    self._chunk_state = self._reader.get_state()   # grain's state before _chunk was read
    self._text = 0                                 # the next text of _chunk to read
    self._buffer: list = []                        # examples of the text read last
    self._next = 0
    # Where the text in _buffer was read from, and the stats before it: restoring them and
    # reading that text again gives the same _buffer and stats.
    self._before = {"reader": self._chunk_state, "text": 0}
    self._stats_before = DataStats()
    self.stats = DataStats()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    tokens = np.full((self._batch_size, self._max_len), PAD_ID, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for row in range(self._batch_size):
      ids = self._next_example()
      tokens[row, :len(ids)] = ids
      mask[row, :len(ids)] = True
    return {"tokens": tokens, "mask": mask}

  def _next_example(self) -> np.ndarray:
    while self._next >= len(self._buffer):
      self._read()
    self._next += 1
    return self._buffer[self._next - 1]

  def _read(self) -> None:
    if self._text >= len(self._chunk):
      self._chunk_state = self._reader.get_state()
      self._chunk, self._text = next(self._reader), 0
    self._before = {"reader": self._chunk_state, "text": self._text}
    self._stats_before = self.stats.copy()
    encoded = self._chunk[self._text]
    self._text += 1
    self.stats.add(encoded)
    self._buffer, self._next = encoded.examples, 0

  def get_state(self) -> dict:
    return {**self._before, "next_example": self._next, "texts_per_read": TEXTS_PER_READ,
            "stats": self._stats_before.to_json()}

  def set_state(self, state: dict) -> None:
    if "reader" not in state:  # saved before the iterator counted its texts: grain's own
      state = {"reader": state, "next_example": 0, "stats": DataStats().to_json()}
    reader, text = state["reader"], state.get("text", 0)
    if "texts_per_read" not in state:  # saved when grain's elements were single texts
      reader, text = ({**reader, "next_index": reader["next_index"] // TEXTS_PER_READ},
                      reader["next_index"] % TEXTS_PER_READ)
    elif state["texts_per_read"] != TEXTS_PER_READ:
      raise ValueError(
          f"This data position was saved reading {state['texts_per_read']} texts per grain "
          f"element; this code reads {TEXTS_PER_READ} (pipeline.TEXTS_PER_READ). Resume with "
          "the code that wrote the checkpoint, or start a new workdir.")
    self._reader.set_state(reader)
    self._chunk_state, self._text = reader, text
    self._chunk = next(self._reader) if text else ()
    self.stats = DataStats.from_json(state["stats"])
    self._stats_before = self.stats.copy()
    self._before = {"reader": reader, "text": text}
    self._buffer, self._next = [], 0
    if state["next_example"]:
      self._read()
      self._next = int(state["next_example"])


def train_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
  """This process's endless iterator of training batches (checkpointable).

  The global batch ``config.train.batch_size`` is split evenly over processes; process ``i``
  reads texts i, i + n, i + 2n, ... of the shuffled stream.
  """
  batch = int(config.train.batch_size)
  if batch % process_count:
    raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} "
                     "processes; pick a multiple.")
  ds = _encoded(config, tokenizer, "train", process_index, process_count)
  return TrainIterator(ds, batch // process_count, int(config.data.max_len))


def eval_batches(config, tokenizer: Tokenizer, split: str = "validation", *,
                 batch_size: Optional[int] = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
  """All held-out batches of this process (the last one padded with empty rows)."""
  batch_size = batch_size or int(config.train.batch_size)
  max_len = int(config.data.max_len)
  stats = DataStats()
  examples = []
  for chunk in _encoded(config, tokenizer, split, process_index, process_count):
    for encoded in chunk:
      stats.add(encoded)
      examples.extend(encoded.examples)
  logging.info("%s split: %s", split, stats.line())
  batches = []
  for start in range(0, len(examples), batch_size):
    tokens = np.full((batch_size, max_len), PAD_ID, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for row, ids in enumerate(examples[start:start + batch_size]):
      tokens[row, :len(ids)] = ids
      mask[row, :len(ids)] = True
    batches.append({"tokens": tokens, "mask": mask})
  return batches
